#!/usr/bin/env bash
# System packages genbench uses, from Debian, installed when missing and we can (root or sudo -n):
#   data      dataset-fashion-mnist (idx .gz files in /usr/share/datasets/fashion-mnist),
#             skipped when GENBENCH_DATA points elsewhere; fonts-noto-color-emoji (the font the
#             emoji dataset is rendered from), skipped when GENBENCH_DATA holds NotoColorEmoji.ttf
#   chromium  headless browser for the report test (tests/evaluation/test_compare_report.py)
# Nothing here is fatal: without a package the tests that need it are skipped with the reason.
set -u
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi

install() {  # install <debian-package> <what-it-is-for>
  if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null; then
    echo "genbench: $2 missing; install it with 'sudo apt-get install $1'" >&2
    return 0
  fi
  echo "genbench: installing Debian package $1 ($2)" >&2
  $SUDO apt-get install -y -q "$1" >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$1" >/dev/null 2>&1; } ||
    echo "genbench: could not install $1" >&2
}

for what in "$@"; do
  case "$what" in
    data)
      if [ -z "${GENBENCH_DATA:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        install dataset-fashion-mnist "Fashion-MNIST"
      fi
      emoji_font=NotoColorEmoji.ttf
      if [ ! -f "/usr/share/fonts/truetype/noto/$emoji_font" ] && [ ! -f "${GENBENCH_DATA:-/nonexistent}/$emoji_font" ] &&
         [ ! -f "${GENBENCH_DATA:-/nonexistent}/emoji/$emoji_font" ]; then
        install fonts-noto-color-emoji "the emoji dataset's font"
      fi ;;
    chromium)
      command -v chromium >/dev/null || install chromium "headless Chromium for the report test" ;;
    *) echo "setup_system.sh: unknown component $what" >&2; exit 2 ;;
  esac
done
exit 0
