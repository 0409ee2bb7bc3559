// Sample edgeward module in JavaScript: the temperature sensor's job.
//
// The same readings as `modules/temperature-sensor` (Rust), through the same
// WIT (`edgeward:host/command`), built with componentize-js:
//
//     componentize-js --wit wit --world-name edgeward:host/command \
//         -o js-sensor.wasm modules/js-sensor/sensor.js
//
// Prints one JSON reading per interval to stdout, signed by the module's
// X509-SVID key and carrying a JWT-SVID for the telemetry audience:
//
//     {"sensor":"s1","seq":1,"celsius":21.03,"ts_ms":1764374400000,"sig":"<hex DER>","token":"<JWT>"}
//
// `sig` is ECDSA P-256 / SHA-256 over the bare reading (the line up to
// `,"sig"` followed by `}`); the first reading and every reading after a
// renewal carry the certificate chain as `"cert"`.
//
// Settings, each from the module's settings (`wasi:config/store`, lower-case
// key), else the environment (upper-case): `sensor_id` (default `sensor-0`),
// `interval_ms` (1000, 1..=86400000), `count` (0: forever), `token_audience`
// (`edgeward-telemetry`).

import { identityCertificate, sign, token } from "edgeward:host/workload@0.1.0";
import { get } from "wasi:config/store@0.2.0-rc.1";
import { getEnvironment } from "wasi:cli/environment@0.2.12";
import { subscribeDuration } from "wasi:clocks/monotonic-clock@0.2.12";
import { now as wallNow } from "wasi:clocks/wall-clock@0.2.12";

const PROGRAM = "js-sensor";
const TOKEN_TTL = 300;

class SettingError extends Error {}

// A WIT error (`edgeward:host/types.error`) as `kind: message`.
function describe(e) {
  const v = e && e.payload !== undefined ? e.payload : e;
  return v && v.tag ? `${v.tag}: ${v.val}` : String(v);
}

function setting(key) {
  let value;
  try {
    value = get(key);
  } catch (e) {
    throw new SettingError(`settings: ${describe(e)}`);
  }
  if (value !== undefined && value !== null) return [key, value];
  const name = key.toUpperCase();
  for (const [k, v] of getEnvironment()) {
    if (k === name) return [name, v];
  }
  return null;
}

function number(key, fallback, low, high) {
  const found = setting(key);
  if (found === null) return fallback;
  const [name, raw] = found;
  if (!/^\s*\d+\s*$/.test(raw)) {
    throw new SettingError(`${name}=${JSON.stringify(raw)} is not a whole number`);
  }
  const value = BigInt(raw.trim());
  if (value < low || value > high) {
    throw new SettingError(`${name}=${value} is out of range ${low}..=${high}`);
  }
  return value;
}

function text(key, fallback) {
  const found = setting(key);
  return found === null ? fallback : found[1];
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

// A signature over `data` and the chain that verifies it; a pair that
// straddles a renewal is signed again.
function signed(data) {
  let sig, after;
  for (let i = 0; i < 3; i++) {
    const before = identityCertificate().certificateChain;
    sig = sign(data);
    after = identityCertificate().certificateChain;
    if (before === after) break;
  }
  return [sig, after];
}

function nowMs() {
  const t = wallNow();
  return Number(t.seconds) * 1000 + Math.floor(t.nanoseconds / 1e6);
}

export const run = {
  run() {
    let sensorId, intervalNs, count, audience;
    try {
      sensorId = text("sensor_id", "sensor-0");
      intervalNs = number("interval_ms", 1000n, 1n, 86400000n) * 1000000n;
      count = number("count", 0n, 0n, 18446744073709551615n);
      audience = text("token_audience", "edgeward-telemetry");
    } catch (e) {
      console.error(`${PROGRAM}: ${e.message}`);
      throw e;
    }
    // Seeded from the clock and the sensor's name (FNV-1a), so sensors
    // started in the same millisecond still read differently.
    const mask = (1n << 64n) - 1n;
    let seed = 0xcbf29ce484222325n;
    for (const b of new TextEncoder().encode(sensorId)) {
      seed = ((seed ^ BigInt(b)) * 0x100000001b3n) & mask;
    }
    let noise = (BigInt(nowMs()) * 1000000n ^ seed) | 1n;
    const unit = () => {
      noise ^= (noise << 13n) & mask;
      noise ^= noise >> 7n;
      noise ^= (noise << 17n) & mask;
      return Number(noise >> 11n) / 2 ** 53;
    };

    let celsius = 21.0;
    let seq = 0n;
    let tok = null;
    const warned = new Set();
    let lastCert = "";
    for (;;) {
      seq += 1n;
      celsius += (unit() - 0.5) * 0.4 + (21.0 - celsius) * 0.05;
      const reading = `{"sensor":${JSON.stringify(sensorId)},"seq":${seq},"celsius":${celsius.toFixed(2)},"ts_ms":${nowMs()}}`;
      let line = reading.slice(0, -1);
      try {
        const [sig, cert] = signed(new TextEncoder().encode(reading));
        line += `,"sig":"${hex(sig)}"`;
        if (cert !== lastCert) {
          line += `,"cert":${JSON.stringify(cert)}`;
          lastCert = cert;
        }
      } catch (e) {
        if (!warned.has("sign")) {
          console.error(`${PROGRAM}: readings are unsigned: ${describe(e)}`);
          warned.add("sign");
        }
      }
      const nowS = Math.floor(nowMs() / 1000);
      if (tok === null || tok[1] <= nowS + 60) {
        try {
          tok = [token([audience], TOKEN_TTL), nowS + TOKEN_TTL];
        } catch (e) {
          if (!warned.has("token")) {
            console.error(`${PROGRAM}: no token: ${describe(e)}`);
            warned.add("token");
          }
          tok = null;
        }
      }
      if (tok !== null) line += `,"token":"${tok[0]}"`;
      console.log(line + "}");
      if (count !== 0n && seq >= count) return;
      subscribeDuration(intervalNs).block();
    }
  },
};
