import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import {
  type ClassifierSamples,
  classifierMetrics,
  type ExitClassifierWeights,
  featureCount,
  fitExitClassifier,
  predictExit,
  predictSamples,
  writeFeatures,
} from "../src/ExitClassifier.js"

const D = 8
const vector = fc.array(fc.float({ min: -4, max: 4, noNaN: true }), { minLength: D, maxLength: D })

const weightsArb = (kind: "logistic" | "mlp"): fc.Arbitrary<ExitClassifierWeights> => {
  const units = kind === "mlp" ? 3 : 1
  const inputs = featureCount(D)
  const floats = (n: number) => fc.array(fc.float({ min: -2, max: 2, noNaN: true }), { minLength: n, maxLength: n })
  return fc
    .record({
      w1: floats(units * inputs),
      b1: floats(units),
      w2: floats(kind === "mlp" ? units : 0),
      b2: fc.float({ min: -2, max: 2, noNaN: true }),
    })
    .map((w) => ({
      kind,
      inputs,
      hidden: kind === "mlp" ? units : 0,
      w1: Float32Array.from(w.w1),
      b1: Float32Array.from(w.b1),
      w2: Float32Array.from(w.w2),
      b2: kind === "mlp" ? w.b2 : 0,
    }))
}

describe("ExitClassifier", () => {
  it("predictExit (features folded into the first layer) equals the model on explicit features", () => {
    for (const kind of ["logistic", "mlp"] as const) {
      fc.assert(
        fc.property(weightsArb(kind), vector, vector, (w, h, p) => {
          const hidden = Float32Array.from(h)
          const previous = Float32Array.from(p)
          const features = new Float32Array(featureCount(D))
          writeFeatures(hidden, previous, features)
          const samples: ClassifierSamples = { inputs: featureCount(D), features, labels: new Uint8Array(1) }
          expect(predictExit(w, hidden, previous)).toBeCloseTo(predictSamples(w, samples)[0]!, 5)
        }),
      )
    }
  })

  it("features: scale-free direction, the saturation cosine and log rms", () => {
    const hidden = Float32Array.from([3, 0, 0, 4, 0, 0, 0, 0])
    const out = new Float64Array(featureCount(D))
    writeFeatures(hidden, hidden, out)
    const rms = Math.sqrt(25 / D + 1e-6)
    expect(out[0]).toBeCloseTo(3 / rms, 6)
    expect(out[3]).toBeCloseTo(4 / rms, 6)
    expect(out[D]).toBeCloseTo(1, 6)
    expect(out[D + 1]).toBeCloseTo(Math.log(rms), 6)
    writeFeatures(hidden, new Float32Array(D), out)
    expect(out[D]).toBe(0)
  })

  it("metrics: accuracy, precision, recall, AUC and log loss on a hand-made case", () => {
    const p = Float64Array.from([0.9, 0.8, 0.3, 0.6, 0.2])
    const y = Uint8Array.from([1, 1, 1, 0, 0])
    const m = classifierMetrics(p, y)
    expect(m.accuracy).toBeCloseTo(3 / 5)
    expect(m.majorityAccuracy).toBeCloseTo(3 / 5)
    expect(m.precision).toBeCloseTo(2 / 3)
    expect(m.recall).toBeCloseTo(2 / 3)
    // Pairs (positive, negative) ranked right: (0.9,0.6) (0.9,0.2) (0.8,0.6) (0.8,0.2) (0.3,0.2) of 6.
    expect(m.auc).toBeCloseTo(5 / 6)
    const loss = -(Math.log(0.9) + Math.log(0.8) + Math.log(0.3) + Math.log(0.4) + Math.log(0.8)) / 5
    expect(m.logLoss).toBeCloseTo(loss)
  })

  it("fits what a linear rule separates, and the MLP fits what only a hidden layer can (XOR of two signs)", () => {
    const n = 2000
    const inputs = featureCount(D)
    let seed = 7
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31
      return seed / 2 ** 31 - 0.5
    }
    const make = (label: (x: Float32Array) => boolean) => {
      const features = new Float32Array(n * inputs)
      const labels = new Uint8Array(n)
      for (let s = 0; s < n; s++) {
        const x = features.subarray(s * inputs, (s + 1) * inputs)
        for (let i = 0; i < inputs; i++) x[i] = random() * 2
        labels[s] = label(x) ? 1 : 0
      }
      return { inputs, features, labels }
    }
    const split = (all: ClassifierSamples, from: number, to: number): ClassifierSamples => ({
      inputs,
      features: all.features.subarray(from * inputs, to * inputs),
      labels: all.labels.subarray(from, to),
    })
    const score = (all: ClassifierSamples, kind: "logistic" | "mlp") => {
      const w = fitExitClassifier(split(all, 0, 1500), { kind, seed: 3, hiddenUnits: 8, epochs: 60 })
      const test = split(all, 1500, n)
      return classifierMetrics(predictSamples(w, test), test.labels)
    }
    const linear = make((x) => x[0]! + 0.5 * x[D]! > 0.1)
    expect(score(linear, "logistic").accuracy).toBeGreaterThan(0.95)
    const xor = make((x) => x[0]! * x[1]! > 0)
    expect(score(xor, "logistic").accuracy).toBeLessThan(0.65)
    expect(score(xor, "mlp").accuracy).toBeGreaterThan(0.85)
  })

  it("fits are reproducible for a seed", () => {
    const inputs = featureCount(D)
    const features = Float32Array.from({ length: 50 * inputs }, (_, i) => Math.sin(i))
    const labels = Uint8Array.from({ length: 50 }, (_, i) => (i % 3 === 0 ? 1 : 0))
    const a = fitExitClassifier({ inputs, features, labels }, { kind: "mlp", seed: 5 })
    const b = fitExitClassifier({ inputs, features, labels }, { kind: "mlp", seed: 5 })
    expect(a.w1).toEqual(b.w1)
    expect(a.b2).toBe(b.b2)
  })
})
