"""Sample edgeward module in Python: the temperature sensor's job.

The same readings as `modules/temperature-sensor` (Rust), through the same
WIT (`edgeward:host/command`), built with componentize-py:

    componentize-py -d wit -w edgeward:host/command componentize \
        -p modules/py-sensor app -o py-sensor.wasm

Prints one JSON reading per interval to stdout, signed by the module's
X509-SVID key and carrying a JWT-SVID for the telemetry audience:

    {"sensor":"s1","seq":1,"celsius":21.03,"ts_ms":1764374400000,"sig":"<hex DER>","token":"<JWT>"}

`sig` is ECDSA P-256 / SHA-256 over the bare reading (the line up to
`,"sig"` followed by `}`); the first reading and every reading after a
renewal carry the certificate chain as `"cert"`.

Settings, each from the module's settings (`wasi:config/store`, lower-case
key), else the environment (upper-case): `sensor_id` (default `sensor-0`),
`interval_ms` (1000, 1..=86400000), `count` (0: forever), `token_audience`
(`edgeward-telemetry`).
"""

import json
import os
import sys
import time

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import store, workload

TOKEN_TTL = 300
PROGRAM = "py-sensor"


class SettingError(Exception):
    pass


def describe(err):
    """A WIT error (`edgeward:host/types.error`) as `kind: message`."""
    value = err.value if isinstance(err, Err) else err
    kind = type(value).__name__.removeprefix("Error_")
    return f"{kind}: {getattr(value, 'value', value)}"


def setting(key):
    try:
        value = store.get(key)
    except Err as e:
        raise SettingError(f"settings: {describe(e)}")
    if value is not None:
        return key, value
    name = key.upper()
    if name in os.environ:
        return name, os.environ[name]
    return None


def number(key, default, low, high):
    found = setting(key)
    if found is None:
        return default
    name, raw = found
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a whole number")
    if not low <= value <= high:
        raise SettingError(f"{name}={value} is out of range {low}..={high}")
    return value


def text(key, default):
    found = setting(key)
    return default if found is None else found[1]


def signed(data):
    """A signature over `data` and the chain that verifies it; a pair that
    straddles a renewal is signed again."""
    for _ in range(3):
        before = workload.identity_certificate().certificate_chain
        sig = workload.sign(data)
        after = workload.identity_certificate().certificate_chain
        if before == after:
            break
    return sig, after


class Run(exports.Run):
    def run(self):
        try:
            sensor_id = text("sensor_id", "sensor-0")
            interval = number("interval_ms", 1000, 1, 86_400_000) / 1000
            count = number("count", 0, 0, 2**64 - 1)
            audience = text("token_audience", "edgeward-telemetry")
        except SettingError as e:
            print(f"{PROGRAM}: {e}", file=sys.stderr)
            raise Err(None)

        # Seeded from the clock and the sensor's name (FNV-1a), so sensors
        # started in the same millisecond still read differently.
        seed = 0xCBF29CE484222325
        for b in sensor_id.encode():
            seed = ((seed ^ b) * 0x100000001B3) & (2**64 - 1)
        noise = (time.time_ns() ^ seed) | 1

        def unit():
            nonlocal noise
            noise ^= (noise << 13) & (2**64 - 1)
            noise ^= noise >> 7
            noise ^= (noise << 17) & (2**64 - 1)
            return (noise >> 11) / float(1 << 53)

        celsius = 21.0
        seq = 0
        token = None
        warned = set()
        last_cert = ""
        while True:
            seq += 1
            celsius += (unit() - 0.5) * 0.4 + (21.0 - celsius) * 0.05
            reading = '{"sensor":%s,"seq":%d,"celsius":%.2f,"ts_ms":%d}' % (
                json.dumps(sensor_id), seq, celsius, time.time_ns() // 1_000_000)
            line = reading[:-1]
            try:
                sig, cert = signed(reading.encode())
                line += f',"sig":"{sig.hex()}"'
                if cert != last_cert:
                    line += ',"cert":' + json.dumps(cert)
                    last_cert = cert
            except Err as e:
                if "sign" not in warned:
                    print(f"{PROGRAM}: readings are unsigned: {describe(e)}", file=sys.stderr)
                    warned.add("sign")
            now = int(time.time())
            if token is None or token[1] <= now + 60:
                try:
                    token = (workload.token([audience], TOKEN_TTL), now + TOKEN_TTL)
                except Err as e:
                    if "token" not in warned:
                        print(f"{PROGRAM}: no token: {describe(e)}", file=sys.stderr)
                        warned.add("token")
                    token = None
            if token is not None:
                line += f',"token":"{token[0]}"'
            print(line + "}", flush=True)
            if count and seq >= count:
                return
            time.sleep(interval)
