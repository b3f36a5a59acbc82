"""Where a compiled XLA program spends its time, by kind of operation (from a jax profile).

The velocity network's gap to PyTorch (BENCHMARKS.md, goal 1) is either in the convolution
kernels themselves or around them (layout transposes, normalisation, activations). This
splits one compiled program's op time into
  * 'convolution': ops (or fusions) that contain a convolution or a dot, i.e. XLA's GEMM and
    convolution kernels (XNNPACK/Eigen on CPU), and our compiled kernels' custom calls
    (`progression.models.conv_kernels`);
  * 'layout': transposes and copies (operand re-layouts, e.g. for kernel gradients), with
    whatever elementwise work XLA fused into them;
  * 'other': everything else (elementwise, reductions, pads, slices, concatenations),
by timing a few calls under `jax.profiler.trace` and matching the trace's op events to the
program's HLO instructions. Op time is summed over events, so on a multi-threaded runtime it
can differ from wall time; shares are what to read.
"""

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

KINDS = ('convolution', 'layout', 'other')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$')
_OUR_KERNELS = 'custom_call_target="progression_conv'
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{\s*$')


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> kind (`KINDS`) for every instruction of a compiled module's text."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)
  kinds = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      name, op, rest = match.groups()
      body = ' '.join(' '.join(computations.get(c, []))
                      for c in re.findall(r'calls=%([\w.\-]+)', rest))
      kinds[name] = _kind(op, body, rest)
  return kinds


def _kind(op: str, fused_body: str, operands: str = '') -> str:
  text = f'{op}( {fused_body}'
  if 'convolution(' in text or 'dot(' in text or _OUR_KERNELS in operands:
    return 'convolution'
  if op in ('transpose', 'copy') or ' transpose(' in fused_body or ' copy(' in fused_body:
    return 'layout'
  return 'other'


def op_time_by_kind(compiled: Any, call: Callable[[], Any], calls: int = 3) -> dict[str, float]:
  """Seconds of op time per call of `call` (which runs `compiled`), by kind.

  Args:
    compiled: the `jax.stages.Compiled` that `call` runs (its HLO names the ops).
    call: runs the program once and blocks until its result is ready.
    calls: calls traced (the result is their mean).
  Returns:
    {'convolution': s, 'layout': s, 'other': s, 'total': s, 'share_convolution': fraction, ...}
  """
  import jax
  kinds = instruction_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        call()
    trace = next(Path(tmp).rglob('*.trace.json.gz'), None)
    if trace is None:
      raise RuntimeError(f'jax.profiler wrote no perfetto trace under {tmp}')
    with gzip.open(trace) as f:
      events = json.load(f)['traceEvents']
  seconds = collections.Counter()
  for event in events:
    kind = kinds.get(event.get('name', ''))
    if event.get('ph') == 'X' and kind is not None:
      seconds[kind] += event['dur'] * 1e-6 / calls
  total = sum(seconds.values())
  out = {k: seconds[k] for k in KINDS}
  out['total'] = total
  out.update({f'share_{k}': seconds[k] / total if total else None for k in KINDS})
  return out
