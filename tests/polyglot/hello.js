// A WASI-only JavaScript program (world wasi:cli/command): the baseline
// that `wasmtime run` can run too (tests/benches/polyglot.rs).
export const run = {
  run() {
    console.log("hello from javascript");
  },
};
