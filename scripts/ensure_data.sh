#!/usr/bin/env bash
# Make sure the embedded default data set (Fashion-MNIST as four IDX .gz files) is present.
# Installs Debian's dataset-fashion-mnist when apt is available; otherwise says what to do.
set -euo pipefail
dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have_all() { for f in "${files[@]}"; do [ -s "$dir/$f" ] || return 1; done; }
have_all && exit 0
if [ "$dir" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "Installing Debian package dataset-fashion-mnist (the default data set)..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  have_all && exit 0
fi
cat >&2 <<MSG
Fashion-MNIST is missing from $dir.
Expected the four files: ${files[*]}
- On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
- Elsewhere, on an online machine:
    python -c "import torchvision; torchvision.datasets.FashionMNIST('fmnist', download=True)"
  then run with data.root=fmnist/FashionMNIST/raw (or set FASHION_MNIST_DIR for this script).
MSG
exit 1
