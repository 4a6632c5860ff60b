"""Many processes on one machine: python -m jpost.launch --processes N [...] -- ARGS

    python -m jpost.launch --processes 2 --devices-per-process 4 -- \\
        --config=configs/sft.py:tiny --workdir=runs/sft_2proc

starts N copies of `python -m jpost.main ARGS --config.distributed.enabled=True`,
a multi-controller JAX run, to try on one machine what runs on many hosts.
Process k gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (--port, else a free
port), JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=k; --devices-per-process D gives
each D CPU devices (XLA_FLAGS, JAX_PLATFORMS=cpu). Their output lines come out
prefixed `[pK] `. When one fails, the others get --timeout-s (60) to end by
themselves, then SIGTERM and, 10 s later, SIGKILL. The exit status is the first
failure's (128+S for a process killed by signal S), else 0. SIGINT and SIGTERM
are passed on to the processes.
"""

import argparse
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

KILL_AFTER_S = 10


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, status 2
    self.exit(2, f'{self.prog}: error: {message}\n')


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher options, the arguments after `--`)."""
  split = argv.index('--') if '--' in argv else len(argv)
  parser = _Parser(prog='jpost.launch', description='Runs N local processes of jpost.main.',
                   usage='python -m jpost.launch --processes N [--devices-per-process D] '
                   '[--port P] [--timeout-s S] -- ARGS_FOR_JPOST_MAIN')
  parser.add_argument('--processes', type=int, required=True, metavar='N',
                      help='how many processes')
  parser.add_argument('--devices-per-process', type=int, metavar='D',
                      help='CPU devices per process (default: what JAX finds)')
  parser.add_argument('--port', type=int, metavar='P',
                      help="process 0's port (default: a free one)")
  parser.add_argument('--timeout-s', type=float, default=60.0, metavar='S',
                      help='after a failure, how long the others get to end (default: 60)')
  parser.add_argument('--module', default='jpost.main', help=argparse.SUPPRESS)
  opts = parser.parse_args(argv[:split])
  if opts.processes < 1:
    parser.error(f'--processes={opts.processes}: give 1 or more')
  if opts.devices_per_process is not None and opts.devices_per_process < 1:
    parser.error(f'--devices-per-process={opts.devices_per_process}: give 1 or more')
  if not argv[split + 1:]:
    parser.error(f'give the arguments for {opts.module} after --, e.g. '
                 '-- --config=configs/sft.py:tiny --workdir=runs/sft_2proc')
  return opts, argv[split + 1:]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(k: int, processes: int, port: int, devices: int | None) -> dict[str, str]:
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
             JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(k), PYTHONUNBUFFERED='1')
  if devices is not None:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])
    env['JAX_PLATFORMS'] = 'cpu'
  return env


def _stream(pipe, out, prefix: str, lock: threading.Lock) -> None:
  for line in pipe:
    with lock:
      out.write(prefix + line.removesuffix('\n') + '\n')
      out.flush()


def _signal(procs, signum) -> None:
  for p in procs:
    if p.returncode is None:
      try:
        os.killpg(p.pid, signum)  # the process and anything it started
      except ProcessLookupError:
        pass


def wait(procs, grace_s: float) -> int:
  """Waits for every process: the status of the first to fail, else 0. After
  a failure the others get grace_s to end, then SIGTERM, then SIGKILL."""
  ended = queue.SimpleQueue()  # return codes, in the order the processes end
  for p in procs:
    threading.Thread(target=lambda p=p: ended.put(p.wait()), daemon=True).start()
  failed, pending, stop_at, term_at = 0, len(procs), math.inf, None
  while pending:
    try:
      code = ended.get(timeout=0.1)
      pending -= 1
      if code and not failed:
        failed, stop_at = code, time.monotonic() + grace_s
    except queue.Empty:
      pass
    now = time.monotonic()
    if now >= stop_at and term_at is None:
      running = [k for k, p in enumerate(procs) if p.poll() is None]
      print(f'jpost.launch: process(es) {running} still running {grace_s:g} s after the first '
            'failure: SIGTERM', file=sys.stderr, flush=True)
      _signal(procs, signal.SIGTERM)
      term_at = now
    if term_at is not None and now >= term_at + KILL_AFTER_S:
      _signal(procs, signal.SIGKILL)
  return 128 - failed if failed < 0 else failed


def main(argv: list[str]) -> int:
  opts, args = parse(argv)
  port = opts.port or free_port()
  command = [sys.executable, '-m', opts.module, *args, '--config.distributed.enabled=True']
  procs, lock, threads = [], threading.Lock(), []
  for signum in (signal.SIGINT, signal.SIGTERM):  # children have their own process group
    signal.signal(signum, lambda signum, _: _signal(procs, signum))
  for k in range(opts.processes):
    p = subprocess.Popen(command, env=child_env(k, opts.processes, port, opts.devices_per_process),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors='replace', process_group=0)
    procs.append(p)
    for pipe, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      threads.append(threading.Thread(target=_stream, args=(pipe, out, f'[p{k}] ', lock),
                                      daemon=True))
      threads[-1].start()
  status = wait(procs, opts.timeout_s)
  for t in threads:
    t.join(timeout=5)  # a grandchild may still hold a pipe open
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
