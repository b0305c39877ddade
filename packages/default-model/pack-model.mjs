// npm pack's prepack and postpack: copy the repository's models/default (and its held-out text) into this package,
// then remove the copy, so the tarball carries the model and the repository keeps one copy of it.
import { cpSync, rmSync } from "node:fs"

const here = (path) => new URL(path, import.meta.url)
rmSync(here("./model"), { recursive: true, force: true })
if (process.argv[2] === "copy") {
  cpSync(here("../../models/default"), here("./model"), { recursive: true })
  cpSync(here("../../models/heldout-sample.txt"), here("./model/heldout-sample.txt"))
}
