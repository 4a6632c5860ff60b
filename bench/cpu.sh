#!/usr/bin/env bash
# The CPU benchmarks issue #23's acceptance reads, in one run, on whatever
# machine this is (an AMX Xeon, an EPYC with or without AVX512-BF16):
#   bash bench/cpu.sh OUTDIR [quick]
# Each bench's output goes to OUTDIR/NAME.txt; the last lines printed (and
# OUTDIR/summary.json) are the figures: the machine (CPU model, AMX and
# AVX512-BF16 flags, transparent huge pages, measured bfloat16 peak), SFT
# tokens/s and MFU against TRL in float32 and bf16 autocast (and the
# step's MFU on full rows of random tokens, without the fused attention
# kernel, and in rows of 256 rather than padding-free), the GRPO step
# against TRL's, decode tokens/s (on jpost's decoding kernels and on
# XLA's; transformers' generate on the same batch), SmolLM2's attention
# alone (the fused
# kernel against blockwise), and the bfloat16 matmul speed at a step's
# shapes (with YNNPACK, XLA:CPU's default, and with oneDNN), and SFT on one
# logical CPU against two. The peak is probed in fresh processes at the
# start and the end too; `sft.mfu_of_highest_probe` is the SFT MFU against
# the highest probe of the run, which a low probe cannot flatter. `quick`
# skips the peers, the profile and the one-CPU run. 11-25 minutes on 2
# cores (TRL installed); run nothing else meanwhile (figures of a shared
# 2-core machine move with its load).
# The peers need TRL in the venv: .venv/bin/pip install -e '.[bench]'.
set -u
out=${1:-/tmp/jpost_cpu}
what=${2:-all}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
run() { name=$1; shift; echo "== $name: ${wrap:-}$*"; timeout 1500 ${wrap:-} "$py" "$@" > "$out/$name.txt" 2>&1;
        tail -1 "$out/$name.txt" | cut -c1-400; }
{
  grep -m1 'model name' /proc/cpuinfo
  echo "flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E 'amx|avx512_bf16' | sort -u | tr '\n' ' ')"
  echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
  nproc
  # Two logical CPUs may be one core's two threads, sharing its AMX unit.
  lscpu 2>/dev/null | grep -E '^(Thread|Core|Socket)|cache'
  # What fresh memory costs to touch, in 4 KB and in 2 MB pages (jpost/host.py:
  # huge pages only for the SFT-like recipes, after a Xeon VM where a fresh huge
  # page cost milliseconds; on the Zen 5 EPYC the GRPO demo ran 5% faster with them).
  "$py" - <<'PY'
import mmap, time
def touch(huge, size=64 << 20):
  m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  if huge and hasattr(mmap, 'MADV_HUGEPAGE'):
    m.madvise(mmap.MADV_HUGEPAGE)
  start = time.perf_counter()
  for offset in range(0, size, 4096):
    m[offset] = 1
  seconds = time.perf_counter() - start
  m.close()
  return seconds * 1e3
print('touching 64 MB of fresh memory, ms (3 tries each): 4 KB pages',
      [round(touch(False), 1) for _ in range(3)], '2 MB pages', [round(touch(True), 1) for _ in range(3)])
PY
} | tee "$out/machine.txt"
# The bfloat16 peak in a fresh process, at the start and again at the end:
# with every bench's own probe, the highest reading is the denominator of
# the summary's conservative SFT MFU (a busy or slow hour reads it low).
probe='import json, sys; sys.path.insert(0, "bench"); import common; print(json.dumps({"machine": common.machine()}))'
run peak_first -c "$probe"
run matmul_shapes bench/matmul_shapes.py
XLA_FLAGS=--xla_cpu_use_onednn=true run matmul_shapes_onednn bench/matmul_shapes.py
run sft bench/sft_throughput.py --steps 4
# The same step on random rows, every slot a real token: its MFU without the
# padding that GSM8K's answer lengths leave in 256-token rows (at most 83.4%
# of the slots are real there).
run sft_full_rows bench/sft_throughput.py --steps 4 --random-init
# The step without the fused CPU attention kernel ('auto' takes it where it
# builds; without it the batch is 8 rows of 256), and with the kernel but in
# rows of 256 rather than padding-free ('auto' packs the batch as one row
# where the kernel runs: it computes only each sample's own keys, so the
# row's length costs it nothing, and GSM8K fills 2048 slots to 99.7%
# against 83% in rows of 256).
run sft_blockwise bench/sft_throughput.py --steps 4 --attention blockwise
run sft_rows bench/sft_throughput.py --steps 4 --padding-free off
run grpo bench/grpo_step.py --steps 5
# SmolLM2's attention alone (9 query heads over 3 key heads, 8 rows of 256
# tokens with three samples each): the fused CPU kernel against blockwise.
run attention bench/attention_check.py --batch 8 --seq-len 256 --heads 9 --kv-heads 3 \
  --impls blockwise,cpu --repeats 30
# Decoding with its matmuls and attention on jpost's CPU kernels ('auto',
# where the CPU has AVX512-BF16) and on XLA's: on an AMX Xeon, XLA's
# matmuls may be the faster.
run generate bench/generate_throughput.py --batches 16 --dtypes bfloat16 --decode-kernels auto,xla
if [ "$what" != quick ]; then
  if "$py" -c 'import trl' 2>/dev/null; then
    run peer_sft bench/peer_trl_sft.py --steps 4
    run peer_grpo bench/peer_trl_grpo.py --steps 3
  else
    echo "TRL is not installed: no peer figures (.venv/bin/pip install -e '.[bench]')"
  fi
  # transformers' generate on the generation line's prompts and batch (a test extra).
  run peer_generate bench/peer_hf_generate.py --batches 16
  run profile bench/profile_step.py --remat dots --by-source --matmuls
  # The GRPO step with its rollout on XLA's operations rather than jpost's kernels.
  run grpo_xla_decode bench/grpo_step.py --steps 5 --decode-kernels xla
  # The SFT step on one logical CPU: where the two are one core's threads,
  # the second adds little (two cores: 1.6-1.9x one on the EPYC).
  if command -v taskset > /dev/null; then
    wrap='taskset -c 0 ' run sft_one_cpu bench/sft_throughput.py --steps 3
  fi
fi
run peak_last -c "$probe"
"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])

def last_json(name):
  path = out / f'{name}.txt'
  if not path.exists():
    return None
  for line in reversed(path.read_text().splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except ValueError:
        return None
  return None

sft, grpo, gen = last_json('sft'), last_json('grpo'), last_json('generate')
one_cpu, profile = last_json('sft_one_cpu'), last_json('profile')
full_rows = last_json('sft_full_rows')
blockwise, rows_256 = last_json('sft_blockwise'), last_json('sft_rows')
peer_sft, peer_grpo = last_json('peer_sft'), last_json('peer_grpo')
summary = {'machine': (sft or {}).get('machine')}
if sft:
  summary['sft'] = {'tokens_per_s': sft['tokens_per_s'], 'mfu': sft['mfu'],
                    'peak_rss_mb': sft.get('peak_rss_mb')}
# Every probe of the peak on both CPUs in this run: the fresh processes'
# and each bench's own (not the one-CPU run's, which is one CPU's). A
# process in a slow stretch probes low and so reads its MFU high (an SFT
# process here once probed 773 GFLOP/s where the others read 791-965); the
# SFT MFU against the highest probe is the figure no low probe flatters.
probes = [result['machine']['peak_bf16_gflops'] for result in (
    last_json(name) for name in ('peak_first', 'peak_last', 'sft', 'sft_full_rows',
                                 'sft_blockwise', 'sft_rows', 'grpo', 'generate', 'profile'))
          if result and (result.get('machine') or {}).get('peak_bf16_gflops')]
probes += [s['peak_flops_measured'] / 1e9 for s in (sft or {}).get('settings', [])]
if probes:
  summary['peak_probes_gflops'] = sorted(round(p, 1) for p in probes)
if sft and probes:
  best = max(sft['settings'], key=lambda s: s['tokens_per_s'])
  flops_per_s = best['mfu'] * best['peak_flops_measured']
  summary['sft']['mfu_of_highest_probe'] = round(flops_per_s / (max(probes) * 1e9), 4)
if sft and full_rows:
  summary['sft']['full_rows'] = {'tokens_per_s': full_rows['tokens_per_s'],
                                 'mfu': full_rows['mfu']}
for key, result in (('blockwise_attention', blockwise), ('rows_8x256', rows_256)):
  if sft and result:
    summary['sft'][key] = {'tokens_per_s': result['tokens_per_s'], 'mfu': result['mfu']}
if sft and one_cpu:
  summary['sft']['one_cpu'] = {'tokens_per_s': one_cpu['tokens_per_s'], 'mfu': one_cpu['mfu'],
                               'peak_bf16_gflops': one_cpu['machine'].get('peak_bf16_gflops'),
                               'two_over_one': round(sft['tokens_per_s'] / one_cpu['tokens_per_s'], 2)}
if sft and profile and 'matmuls' in profile:
  summary['sft']['profile_matmuls'] = profile['matmuls']  # random weights, one profiled step
if sft and peer_sft:
  for s in peer_sft['settings']:
    summary['sft'][f'vs_trl_{s["dtype"]}'] = round(sft['tokens_per_s'] / s['tokens_per_s'], 2)
if grpo:
  summary['grpo'] = {k: grpo[k] for k in ('s_per_step', 'warm_s_per_step', 'rollout_s',
                                         'update_s', 'peak_rss_mb')}
grpo_xla = last_json('grpo_xla_decode')
if grpo and grpo_xla:
  summary['grpo']['xla_decode_rollout'] = {k: grpo_xla[k] for k in ('s_per_step', 'rollout_s')}
if grpo and peer_grpo:
  for s in peer_grpo['settings']:
    summary['grpo'][f'vs_trl_{s["dtype"]}'] = round(s['s_per_step'] / grpo['s_per_step'], 2)
if gen:
  summary['generate_tokens_per_s'] = gen.get('tokens_per_s')
  summary['generate_by_decode_kernels'] = {r.get('decode_kernels', 'auto'): r['tokens_per_s']
                                          for r in gen.get('settings', [])}
peer_gen = last_json('peer_generate')
if gen and peer_gen:
  for s in peer_gen['settings']:
    summary[f'generate_vs_transformers_{s["dtype"]}'] = round(
        gen['tokens_per_s'] / s['tokens_per_s'], 2)
attention = last_json('attention')
if attention:
  summary['attention_fwd_bwd_ms'] = {f"{r['impl']} {r['dtype']}": r.get('fwd_bwd_ms', r.get('failed'))
                                     for r in attention['results']}
(out / 'summary.json').write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
