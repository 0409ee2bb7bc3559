"""A WASI-only Python program (world wasi:cli/command): the baseline that
`wasmtime run` can run too (tests/benches/polyglot.rs)."""

from wit_world import exports


class Run(exports.Run):
    def run(self):
        print("hello from python")
