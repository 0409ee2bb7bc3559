// Test guest in JavaScript for the `workload` interface: the Rust
// identity-probe's protocol (`probe ACTION ARGS...`, one `LABEL ok VALUE` or
// `LABEL err VARIANT: MESSAGE` line per result), so the same checks verify
// what a JavaScript module gets through the WIT. Built by tests/build.rs
// with componentize-js against `edgeward:host/command`.
//
// Actions: `whoami`; `token AUD... TTL`; `validate TOKEN AUD`; `cert`;
// `sign TEXT`; `seal TEXT AAD OTHER` (encrypts, then decrypts with AAD and
// with OTHER, in one run: a run's registration is its own);
// `server-cert CN NAME...`; `setting KEY`; `bad-input`; hostile ones:
// `bomb` (allocates until stopped), `spin` (never yields).

import {
  whoami, token, validateToken, identityCertificate, serverCertificate,
  sign, encrypt, decrypt,
} from "edgeward:host/workload@0.1.0";
import { get } from "wasi:config/store@0.2.0-rc.1";
import { getArguments } from "wasi:cli/environment@0.2.12";

const enc = new TextEncoder();
const dec = new TextDecoder();
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

function variant(e) {
  const v = e && e.payload !== undefined ? e.payload : e;
  if (v && v.tag) return `${v.tag}: ${v.val}`;
  throw e; // not a WIT error: let it fail the run
}

function report(label, call, show = String) {
  try {
    console.log(`${label} ok ${show(call())}`);
  } catch (e) {
    console.log(`${label} err ${variant(e)}`);
  }
}

const credentials = (c) => `${c.certificateChain}${c.privateKey}expires ${c.expiresAt}`;

function badInput() {
  const big = new Uint8Array(1024 * 1024 + 1);
  const cases = [
    ["empty-audience", () => token([], 60)],
    ["empty-audience-string", () => token([""], 60)],
    ["ttl-zero", () => token(["a"], 0)],
    ["too-many-audiences", () => token(Array.from({ length: 17 }, (_, i) => `${i}`), 60)],
    ["long-audience", () => token(["a".repeat(257)], 60)],
    ["sign-oversized", () => sign(big)],
    ["encrypt-oversized", () => encrypt(big, new Uint8Array())],
    ["decrypt-empty", () => decrypt(new Uint8Array(), new Uint8Array())],
    ["validate-garbage", () => validateToken("not.a.token", "a")],
    ["server-cert-wildcard", () => serverCertificate("x", ["*.example.com"])],
  ];
  for (const [label, call] of cases) report(label, call, () => "unexpected");
  console.log("bad-input done");
}

export const run = {
  run() {
    const args = getArguments().slice(1);
    const a = (i) => args[i] ?? "";
    switch (args[0]) {
      case "whoami": {
        const me = whoami();
        console.log(`module_name=${me.moduleName}`);
        console.log(`device_id=${me.deviceId}`);
        console.log(`generation_id=${me.generationId}`);
        console.log(`digest=${me.digest}`);
        console.log(`spiffe_id=${me.spiffeId}`);
        break;
      }
      case "token":
        report("token", () => token(args.slice(1, -1), Number(args[args.length - 1])));
        break;
      case "validate":
        report("validate", () => validateToken(a(1), a(2)),
          (c) => `${c.subject} ${c.audience.join(",")} ${c.digest}`);
        break;
      case "cert":
        try {
          console.log(credentials(identityCertificate()));
        } catch (e) {
          console.log(`cert err ${variant(e)}`);
        }
        break;
      case "server-cert":
        try {
          console.log(credentials(serverCertificate(a(1), args.slice(2))));
        } catch (e) {
          console.log(`server-cert err ${variant(e)}`);
        }
        break;
      case "sign":
        try {
          console.log(`sign ok ${hex(sign(enc.encode(a(1))))}`);
          console.log(identityCertificate().certificateChain);
        } catch (e) {
          console.log(`sign err ${variant(e)}`);
        }
        break;
      case "seal": {
        const sealed = encrypt(enc.encode(a(1)), enc.encode(a(2)));
        console.log(`encrypt ok ${hex(sealed)}`);
        report("decrypt", () => decrypt(sealed, enc.encode(a(2))), (b) => dec.decode(b));
        report("decrypt-other", () => decrypt(sealed, enc.encode(a(3))), (b) => dec.decode(b));
        break;
      }
      case "setting":
        report("setting", () => get(a(1)));
        break;
      case "bad-input":
        badInput();
        break;
      case "bomb": {
        const hoard = [];
        for (;;) {
          hoard.push(new Uint8Array(1 << 20).fill(1));
          if (hoard.length % 16 === 0) console.log(`bomb ${hoard.length} MiB`);
        }
      }
      case "spin": {
        console.log("spinning");
        let n = 0;
        for (;;) n++;
      }
      default:
        console.error(`unknown action ${JSON.stringify(args[0])}`);
        throw new Error("unknown action");
    }
  },
};
