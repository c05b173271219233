#!/usr/bin/env bash
# Fashion-MNIST comes from Debian's package dataset-fashion-mnist (idx .gz files in
# /usr/share/datasets/fashion-mnist). Install it when missing and we can; otherwise say how.
# GENBENCH_DATA (or --data-dir) points genbench elsewhere, in which case nothing is installed.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -n "${GENBENCH_DATA:-}" ] || [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "genbench: installing Debian package dataset-fashion-mnist" >&2
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) ||
    echo "genbench: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    echo "genbench: could not install dataset-fashion-mnist" >&2
else
  echo "genbench: Fashion-MNIST not found in $dir; run 'sudo apt-get install dataset-fashion-mnist'" \
       "or set GENBENCH_DATA (the digits dataset needs nothing)" >&2
fi
exit 0
