# Downloads, here, the wheels that benchmarks/gpu_speed.sh needs on a lent GPU machine and that its image lacks
# or has too old (/work/.library/device/KINDS.md lists the image's packages: it has torch, transformers 5.17,
# peft, accelerate, pandas, pyarrow, but no trl, datasets or pydantic). Versions from constraints.txt; Python 3.12
# manylinux wheels, as the GPU image runs. Run from the repository's root: bash benchmarks/gpu_wheels.sh
# The folder .whl is ignored by git (add /.whl/ to .git/info/exclude) and travels with carry=[".whl"].
set -e
pin() { grep -i -E "^$1==" constraints.txt | head -n 1; }
NEEDED="transformers trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection huggingface_hub httpx2 httpcore2 tokenizers httpx httpcore truststore"
mkdir -p .whl
for name in $NEEDED; do
  spec=$(pin "$name"); [ -n "$spec" ] || { echo "no pin for $name in constraints.txt"; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
du -sh .whl
