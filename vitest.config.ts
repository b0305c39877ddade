import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["packages/*/test/**/*.test.ts", "apps/*/test/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // onnxruntime sessions are native and CPU-bound; forks isolate them and keep the 2-core CI machine predictable.
    pool: "forks",
  },
})
