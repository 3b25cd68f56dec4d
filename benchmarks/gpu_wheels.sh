#!/usr/bin/env bash
# Fetches the wheels benchmarks/gpu_table.sh installs on a GPU machine without a package index:
# what its image (Python 3.12, jax/flax/optax/orbax/torch/transformers/accelerate already there)
# lacks for prefjax, TRL and Tunix. Run where pip reaches PyPI:
#
#   bash benchmarks/gpu_wheels.sh .whl      # ~18 MB; .whl is ignored by git (.git/info/exclude)
set -euo pipefail
dest=${1:?usage: gpu_wheels.sh DEST_DIR}
mkdir -p "$dest"
binary=(array-record==0.8.6 clu==0.0.12 datasets==5.2.0 dill==0.4.1 dm-tree==0.1.10 docstring-parser==0.18.0
        google-metrax==0.2.4 google-tunix==0.1.7 googleapis-common-protos==1.76.0 grain==0.2.18
        hf-transfer==0.1.9 immutabledict==4.3.1 importlib-resources==7.1.0 kagglehub==1.0.3
        ml-collections==1.1.0 multiprocess==0.70.19 omegaconf==2.4.0 perfetto==0.59.1 portpicker==1.6.0
        python-dotenv==1.2.4 qwix==0.1.8 simple-parsing==0.1.9 tenacity==9.2.1 tensorboardx==2.6.5
        tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 trl==1.16.0)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${binary[@]}"
# Published as source only; all three are pure Python, so a wheel built here installs there.
python3 -m pip wheel -q --no-deps -w "$dest" antlr4-python3-runtime==4.9.3 pylatexenc==2.11 promise==2.3
