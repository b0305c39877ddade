export * as HfTokenizer from "./HfTokenizer.js"
