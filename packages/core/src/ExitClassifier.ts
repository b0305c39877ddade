/**
 * Exit classifiers: a small learned model per early exit that predicts, from the exit's hidden state alone, whether
 * the exit head's top token would equal the full-depth head's. It decides without the vocabulary head, which costs
 * about a layer's work and a half on the default model, so a row that goes on pays almost nothing at the exit.
 *
 * Features (both the fitted model and its ONNX graph compute exactly these): the hidden state divided by its root
 * mean square (the scale-free part of what the shared head's RMSNorm sees), then the cosine of the hidden state with
 * the previous exit's (CALM's state saturation; the embedding before the first exit), then log of the root mean
 * square. A classifier is logistic regression on them, or one hidden ReLU layer before it.
 *
 * `fitExitClassifier` trains one from labelled samples with Adam on the log loss; `classifierMetrics` scores it.
 * Everything here is pure and allocation-free where it runs per token (`predictExit`).
 */

/** The key of an exit classifier graph's metadata_props entry that describes it (JSON: version, kind, inputs, hidden). */
export const EXIT_CLASSIFIER_METADATA = "offramp.exit_classifier"

/** The initializer names of the weights in a classifier graph, which the runner reads back. */
export const EXIT_CLASSIFIER_TENSORS = {
  w1: "classifier_w1",
  b1: "classifier_b1",
  w2: "classifier_w2",
  b2: "classifier_b2",
} as const

/** Features per row for a hidden size D: D normalised components, the saturation cosine and log RMS. */
export const featureCount = (hidden: number): number => hidden + 2

/** The fitted parameters. `hidden` is 0 for logistic regression (then w1/b1 are the only layer). */
export interface ExitClassifierWeights {
  readonly kind: "logistic" | "mlp"
  /** Features in (featureCount(D)). */
  readonly inputs: number
  /** Hidden units of the MLP; 0 for logistic regression. */
  readonly hidden: number
  /** [units × inputs] row-major, units = hidden (MLP) or 1 (logistic). */
  readonly w1: Float32Array
  readonly b1: Float32Array
  /** [hidden] output weights of the MLP (empty for logistic). */
  readonly w2: Float32Array
  readonly b2: number
}

const RMS_EPS = 1e-6

/** [rms, cosine, dot with the weights] of a row, in a buffer reused from call to call (nothing allocated per token). */
const scalars = new Float64Array(3)

/**
 * The row's root mean square, its cosine with the previous exit's state (0 for a zero vector) and, given `weights`,
 * its dot product with their first D values (logistic regression's, in the same pass over the row), into `scalars`.
 */
const rowScalars = (hidden: Float32Array, previous: Float32Array, weights?: Float32Array): Float64Array => {
  const D = hidden.length
  let ss = 0
  let dot = 0
  let pp = 0
  let z = 0
  for (let i = 0; i < D; i++) {
    const h = hidden[i]!
    const p = previous[i]!
    ss += h * h
    dot += h * p
    pp += p * p
    if (weights) z += weights[i]! * h
  }
  scalars[0] = Math.sqrt(ss / D + RMS_EPS)
  scalars[1] = ss === 0 || pp === 0 ? 0 : dot / Math.sqrt(ss * pp)
  scalars[2] = z
  return scalars
}

/** Writes the features of one row into `out` (length featureCount(D)). */
export const writeFeatures = (hidden: Float32Array, previous: Float32Array, out: Float32Array | Float64Array): void => {
  const D = hidden.length
  const stats = rowScalars(hidden, previous)
  const rms = stats[0]!
  const cosine = stats[1]!
  for (let i = 0; i < D; i++) out[i] = hidden[i]! / rms
  out[D] = cosine
  out[D + 1] = Math.log(rms)
}

const sigmoid = (z: number) => 1 / (1 + Math.exp(-z))

/**
 * The probability that exiting is safe for one row, straight from the hidden states: the features are folded into
 * the first layer's dot products, so nothing is allocated. About D·(units+1) multiply-adds.
 */
export const predictExit = (w: ExitClassifierWeights, hidden: Float32Array, previous: Float32Array): number => {
  const D = hidden.length
  const { w1, b1, inputs } = w
  if (w.hidden === 0) {
    // Logistic regression: the statistics and the one dot product in a single pass over the row.
    const stats = rowScalars(hidden, previous, w1)
    const rms = stats[0]!
    return sigmoid(stats[2]! / rms + w1[D]! * stats[1]! + w1[D + 1]! * Math.log(rms) + b1[0]!)
  }
  const stats = rowScalars(hidden, previous)
  const rms = stats[0]!
  const inv = 1 / rms
  const cos = stats[1]!
  const logRms = Math.log(rms)
  let out = w.b2
  for (let u = 0; u < w.hidden; u++) {
    const row = u * inputs
    let z = 0
    for (let i = 0; i < D; i++) z += w1[row + i]! * hidden[i]!
    z = z * inv + w1[row + D]! * cos + w1[row + D + 1]! * logRms + b1[u]!
    if (z > 0) out += w.w2[u]! * z
  }
  return sigmoid(out)
}

/** Labelled samples of one exit: features [n × inputs] and labels (1: the exit agrees with full depth). */
export interface ClassifierSamples {
  readonly inputs: number
  readonly features: Float32Array
  readonly labels: Uint8Array
}

export interface FitOptions {
  readonly kind: "logistic" | "mlp"
  /** MLP hidden units (default 16). */
  readonly hiddenUnits?: number
  readonly epochs?: number
  readonly batchSize?: number
  readonly learningRate?: number
  /** L2 penalty on weights (not biases). */
  readonly weightDecay?: number
  /** Seed of the initialisation and the shuffles, so a fit is reproducible. */
  readonly seed?: number
}

/** mulberry32: a small seeded generator, enough for shuffles and initialisation. */
const seeded = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** Evaluates a classifier on a feature row (the features already computed). */
const forward = (w: ExitClassifierWeights, x: Float32Array, offset: number, act: Float64Array | undefined): number => {
  const units = w.hidden === 0 ? 1 : w.hidden
  let out = w.b2
  for (let u = 0; u < units; u++) {
    let z = w.b1[u]!
    const row = u * w.inputs
    for (let i = 0; i < w.inputs; i++) z += w.w1[row + i]! * x[offset + i]!
    if (w.hidden === 0) return z
    const a = Math.max(z, 0)
    if (act) act[u] = a
    out += w.w2[u]! * a
  }
  return out
}

/** The predicted probabilities of every sample. */
export const predictSamples = (w: ExitClassifierWeights, samples: ClassifierSamples): Float64Array => {
  const n = samples.labels.length
  const out = new Float64Array(n)
  for (let s = 0; s < n; s++) out[s] = sigmoid(forward(w, samples.features, s * samples.inputs, undefined))
  return out
}

/**
 * Fits a classifier by mini-batch Adam on the mean log loss (+ L2). Deterministic for a given seed. Float64
 * moments, float32 parameters (what the graph stores).
 */
export const fitExitClassifier = (samples: ClassifierSamples, options: FitOptions): ExitClassifierWeights => {
  const { inputs, features, labels } = samples
  const n = labels.length
  const hidden = options.kind === "mlp" ? (options.hiddenUnits ?? 16) : 0
  const units = hidden === 0 ? 1 : hidden
  const epochs = options.epochs ?? (options.kind === "mlp" ? 40 : 30)
  const batch = options.batchSize ?? 128
  const lr = options.learningRate ?? (options.kind === "mlp" ? 3e-3 : 1e-2)
  const decay = options.weightDecay ?? 1e-4
  const random = seeded(options.seed ?? 1)
  const gaussian = () => Math.sqrt(-2 * Math.log(1 - random())) * Math.cos(2 * Math.PI * random())
  const w1 = new Float32Array(units * inputs)
  if (hidden > 0) for (let i = 0; i < w1.length; i++) w1[i] = gaussian() * Math.sqrt(2 / inputs)
  const b1 = new Float32Array(units)
  const w2 = new Float32Array(hidden)
  for (let i = 0; i < hidden; i++) w2[i] = gaussian() * Math.sqrt(1 / hidden)
  // The output bias starts at the base rate's log-odds.
  let positives = 0
  for (let s = 0; s < n; s++) positives += labels[s]!
  const rate = Math.min(1 - 1e-3, Math.max(1e-3, positives / Math.max(1, n)))
  const weights = { kind: options.kind, inputs, hidden, w1, b1, w2, b2: 0 }
  if (hidden === 0) b1[0] = Math.log(rate / (1 - rate))
  else weights.b2 = Math.log(rate / (1 - rate))

  // Parameters as one flat view for Adam: w1, b1, w2, b2.
  const size = w1.length + units + hidden + 1
  const grad = new Float64Array(size)
  const m = new Float64Array(size)
  const v = new Float64Array(size)
  const act = new Float64Array(units)
  const order = Array.from({ length: n }, (_, i) => i)
  let t = 0
  for (let epoch = 0; epoch < epochs; epoch++) {
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1))
      ;[order[i], order[j]] = [order[j]!, order[i]!]
    }
    for (let start = 0; start < n; start += batch) {
      const end = Math.min(n, start + batch)
      grad.fill(0)
      for (let k = start; k < end; k++) {
        const s = order[k]!
        const off = s * inputs
        const p = sigmoid(forward(weights, features, off, act))
        const d = p - labels[s]! // d loss / d logit
        if (hidden === 0) {
          for (let i = 0; i < inputs; i++) grad[i]! += d * features[off + i]!
          grad[w1.length]! += d
        } else {
          const w2Base = w1.length + units
          for (let u = 0; u < units; u++) {
            grad[w2Base + u]! += d * act[u]!
            if (act[u]! <= 0) continue
            const du = d * w2[u]!
            const row = u * inputs
            for (let i = 0; i < inputs; i++) grad[row + i]! += du * features[off + i]!
            grad[w1.length + u]! += du
          }
          grad[size - 1]! += d
        }
      }
      const count = end - start
      t++
      const c1 = 1 - 0.9 ** t
      const c2 = 1 - 0.999 ** t
      for (let q = 0; q < size; q++) {
        let g = grad[q]! / count
        const param = q < w1.length ? w1 : undefined
        if (param) g += decay * param[q]!
        else if (q >= w1.length + units && q < size - 1) g += decay * w2[q - w1.length - units]!
        m[q] = 0.9 * m[q]! + 0.1 * g
        v[q] = 0.999 * v[q]! + 0.001 * g * g
        const step = (lr * (m[q]! / c1)) / (Math.sqrt(v[q]! / c2) + 1e-8)
        if (q < w1.length) w1[q]! -= step
        else if (q < w1.length + units) b1[q - w1.length]! -= step
        else if (q < size - 1) w2[q - w1.length - units]! -= step
        else weights.b2 -= step
      }
    }
  }
  return weights
}

/** How a classifier does on labelled samples, at a 0.5 cut (the positive class: the exit agrees). */
export interface ClassifierMetrics {
  readonly samples: number
  /** Fraction of samples whose exit agrees with full depth. */
  readonly positiveRate: number
  readonly accuracy: number
  /** Accuracy of always answering the majority class. */
  readonly majorityAccuracy: number
  readonly precision: number
  readonly recall: number
  /** Area under the ROC curve: how well it ranks, whatever the threshold. */
  readonly auc: number
  /** Mean log loss. */
  readonly logLoss: number
}

export const classifierMetrics = (probabilities: Float64Array, labels: Uint8Array): ClassifierMetrics => {
  const n = labels.length
  let tp = 0
  let fp = 0
  let fn = 0
  let tn = 0
  let loss = 0
  for (let i = 0; i < n; i++) {
    const p = Math.min(1 - 1e-12, Math.max(1e-12, probabilities[i]!))
    const y = labels[i]!
    loss -= y ? Math.log(p) : Math.log(1 - p)
    if (p >= 0.5) y ? tp++ : fp++
    else y ? fn++ : tn++
  }
  const positives = tp + fn
  // AUC by the rank-sum (Mann-Whitney), ties counted half.
  const idx = Array.from({ length: n }, (_, i) => i).sort((a, b) => probabilities[a]! - probabilities[b]!)
  let rankSum = 0
  for (let i = 0; i < n; ) {
    let j = i
    while (j + 1 < n && probabilities[idx[j + 1]!] === probabilities[idx[i]!]) j++
    const rank = (i + j) / 2 + 1
    for (let k = i; k <= j; k++) if (labels[idx[k]!]) rankSum += rank
    i = j + 1
  }
  const negatives = n - positives
  const auc =
    positives === 0 || negatives === 0 ? 0.5 : (rankSum - (positives * (positives + 1)) / 2) / (positives * negatives)
  return {
    samples: n,
    positiveRate: positives / n,
    accuracy: (tp + tn) / n,
    majorityAccuracy: Math.max(positives, negatives) / n,
    precision: tp + fp === 0 ? 0 : tp / (tp + fp),
    recall: positives === 0 ? 0 : tp / positives,
    auc,
    logLoss: loss / n,
  }
}
