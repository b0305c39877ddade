import { defineConfig } from "vitest/config"

export default defineConfig({
  // The workspace packages resolve to their TypeScript sources (the "source" export condition), in the tests and in
  // the threads and processes they start.
  resolve: { conditions: ["source"] },
  ssr: { resolve: { conditions: ["source"], externalConditions: ["source"] } },
  test: {
    include: ["packages/*/test/**/*.test.ts", "apps/*/test/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The CLI and server tests run the compiled commands: build them (incrementally) first.
    globalSetup: ["./test/support/build.ts"],
    // onnxruntime sessions are native and CPU-bound; forks isolate them and keep the 2-core CI machine predictable.
    pool: "forks",
    poolOptions: { forks: { execArgv: ["--conditions=source"] } },
  },
})
