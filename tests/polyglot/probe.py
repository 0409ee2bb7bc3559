"""Test guest in Python for the `workload` interface: the Rust
identity-probe's protocol (`probe ACTION ARGS...`, one `LABEL ok VALUE` or
`LABEL err VARIANT: MESSAGE` line per result), so the same checks verify
what a Python module gets through the WIT. Built by tests/build.rs with
componentize-py against `edgeward:host/command`.

Actions: `whoami`; `token AUD... TTL`; `validate TOKEN AUD`; `cert`;
`sign TEXT`; `seal TEXT AAD OTHER` (encrypts, then decrypts with AAD and
with OTHER, in one run: a run's registration is its own);
`server-cert CN NAME...`;
`setting KEY`; `bad-input`; hostile ones: `bomb` (allocates until stopped),
`spin` (never yields), `recurse` (unbounded recursion with the interpreter's
own limit lifted, so the wasm stack overflows: a trap).
"""

import sys

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import store, workload


def variant(e):
    value = e.value if isinstance(e, Err) else e
    kind = type(value).__name__.removeprefix("Error_")
    name = {"NotPermitted": "not-permitted", "InvalidArgument": "invalid-argument",
            "Unavailable": "unavailable", "Internal": "internal"}.get(kind, kind)
    return f"{name}: {value.value}"


def report(label, call, show=str):
    try:
        print(f"{label} ok {show(call())}")
    except Err as e:
        print(f"{label} err {variant(e)}")


def credentials(c):
    return c.certificate_chain + c.private_key + f"expires {c.expires_at}"


def recurse(n):
    return recurse(n + 1) + 1


def bad_input():
    big = bytes(1024 * 1024 + 1)
    cases = [
        ("empty-audience", lambda: workload.token([], 60)),
        ("empty-audience-string", lambda: workload.token([""], 60)),
        ("ttl-zero", lambda: workload.token(["a"], 0)),
        ("too-many-audiences", lambda: workload.token([str(i) for i in range(17)], 60)),
        ("long-audience", lambda: workload.token(["a" * 257], 60)),
        ("sign-oversized", lambda: workload.sign(big)),
        ("encrypt-oversized", lambda: workload.encrypt(big, b"")),
        ("decrypt-empty", lambda: workload.decrypt(b"", b"")),
        ("validate-garbage", lambda: workload.validate_token("not.a.token", "a")),
        ("server-cert-wildcard", lambda: workload.server_certificate("x", ["*.example.com"])),
    ]
    for label, call in cases:
        report(label, call, lambda _: "unexpected")
    print("bad-input done")


class Run(exports.Run):
    def run(self):
        args = sys.argv[1:]
        action = args[0] if args else ""
        a = lambda i: args[i] if i < len(args) else ""
        if action == "whoami":
            me = workload.whoami()
            for k in ("module_name", "device_id", "generation_id", "digest", "spiffe_id"):
                print(f"{k}={getattr(me, k)}")
        elif action == "token":
            report("token", lambda: workload.token(args[1:-1], int(args[-1])))
        elif action == "validate":
            report("validate", lambda: workload.validate_token(a(1), a(2)),
                   lambda c: f"{c.subject} {','.join(c.audience)} {c.digest}")
        elif action == "cert":
            try:
                print(credentials(workload.identity_certificate()))
            except Err as e:
                print(f"cert err {variant(e)}")
        elif action == "server-cert":
            try:
                print(credentials(workload.server_certificate(a(1), args[2:])))
            except Err as e:
                print(f"server-cert err {variant(e)}")
        elif action == "sign":
            try:
                sig = workload.sign(a(1).encode())
                print(f"sign ok {sig.hex()}")
                print(workload.identity_certificate().certificate_chain, end="")
            except Err as e:
                print(f"sign err {variant(e)}")
        elif action == "seal":
            sealed = workload.encrypt(a(1).encode(), a(2).encode())
            print(f"encrypt ok {sealed.hex()}")
            report("decrypt", lambda: workload.decrypt(sealed, a(2).encode()),
                   lambda b: b.decode())
            report("decrypt-other", lambda: workload.decrypt(sealed, a(3).encode()),
                   lambda b: b.decode())
        elif action == "setting":
            report("setting", lambda: store.get(a(1)))
        elif action == "bad-input":
            bad_input()
        elif action == "bomb":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
                if len(hoard) % 16 == 0:
                    print(f"bomb {len(hoard)} MiB", flush=True)
        elif action == "spin":
            print("spinning", flush=True)
            n = 0
            while True:
                n += 1
        elif action == "recurse":
            sys.setrecursionlimit(10**9)
            print(recurse(0))
        else:
            print(f"unknown action {action!r}", file=sys.stderr)
            raise Err(None)
        sys.stdout.flush()
