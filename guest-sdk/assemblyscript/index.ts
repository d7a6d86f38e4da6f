// Package entry for `import ... from "warren-guest"`: everything lives in assembly/index.ts.
export * from "./assembly/index";
