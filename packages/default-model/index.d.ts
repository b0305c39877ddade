/** The staged model directory (model.json, graphs, tokenizer, exit classifiers, calibration). */
export declare const modelDir: string
/** Held-out text of the model's corpus (never trained or calibrated on): the text its quality figures are measured on. */
export declare const heldoutText: string
