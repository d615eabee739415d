# Sourced by the bench/*.sh device scripts: the packages the GPU machine lacks, from the carried
# wheels in .whl/ (diffusers, importlib_metadata; datasets with dill and multiprocess in .whl/ds),
# and the environment every run there needs (NVLink multicast off for NCCL).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
# datasets for diffusers' examples: its own needs (pyarrow, pandas, fsspec, xxhash, ...) are in the image
if ls .whl/ds/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/ds/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
