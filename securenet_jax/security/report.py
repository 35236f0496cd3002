"""The security report: security.json (flat figures + nested sections), security.md, security.png."""

from __future__ import annotations

import json

import numpy as np
from absl import logging

from securenet_jax import metrics
from securenet_jax import workdir as workdir_lib


def write(report_dir, config, flat: dict, sections: dict, timings: dict) -> None:
  """Writes security.json, security.md and security.png into ``report_dir``."""
  report = metrics.rounded(dict(flat, sections=sections, timings_s=timings,
                                target_workdir=str(workdir_lib.Workdir(config.target_workdir)),
                                config=json.loads(config.to_json_best_effort())))
  workdir_lib.write_json(report_dir / 'security.json', report)
  workdir_lib.atomic_write(report_dir / 'security.md', markdown(flat, sections, timings))
  try:
    workdir_lib.atomic_write_with(report_dir / 'security.png', lambda f: figure(f, sections))
  except Exception as e:  # pylint: disable=broad-except  (a figure must not cost the report)
    logging.warning('Could not draw the security figure: %s', e)


def markdown(flat: dict, sections: dict, timings: dict) -> str:
  lines = ['# Security report', '', '| figure | value |', '| --- | --- |']
  lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in flat.items()]
  if 'adversarial' in sections:
    lines += ['', '## Adversarial (robust accuracy)', '', '| eps | attack | value |', '| --- | --- | --- |']
    for eps, row in sections['adversarial'].items():
      if isinstance(row, dict) and eps.startswith('eps='):
        lines += [f'| {eps[4:]} | {k} | {v:.4f} |' for k, v in row.items()]
  if 'theft' in sections:
    lines += ['', '## Theft: a thief with the weights and k% of the labels (accuracy without key)', '',
              'Gain = best move - training from scratch on the same data.', '']
    for k, row in sections['theft'].items():
      if not isinstance(row, dict) or 'licensed' not in row:
        continue
      lic, unp = row['licensed'], row['unprotected']
      lines += [f'### k = {k} ({lic["subset_size"]} labeled images)', '',
                '| move | licensed | unprotected |', '| --- | --- | --- |']
      lines += [f'| {m} | {lic["moves"][m]:.4f} | {unp["moves"].get(m, float("nan")):.4f} |'
                for m in lic['moves']]
      lines += [f'| **gain** (best: {lic["best_move"]} / {unp["best_move"]}) | **{lic["gain"]:+.4f}** | '
                f'{unp["gain"]:+.4f} |', '']
  if 'forgery' in sections:
    lines += ['', '## Near and shifted keys (accuracy)', '', '| key | mean | max |', '| --- | --- | --- |']
    for kind in ('near_keys', 'shifted_keys'):
      for k, v in sections['forgery'][kind].items():
        lines.append(f'| {kind[:-5]} {k} | {v["mean"]:.4f} | {v["max"]:.4f} |')
  if 'backdoor' in sections:
    lines += ['', '## Backdoor', '', 'ASR before: the same triggered inputs on the weights before the '
              "thief's fine-tune (the trigger's own effect).", '',
              '| attack | model | ASR | ASR before | clean acc |', '| --- | --- | --- | --- | --- |']
    for trig, v in sections['backdoor']['thief_finetune'].items():
      lic, unp = v['licensed'], v['unprotected']
      lines.append(f'| thief fine-tune, {trig} | licensed (key + trigger) | {lic["asr_licensed"]:.4f} | '
                   f'{lic["asr_licensed_before"]:.4f} | {lic["clean_acc_licensed"]:.4f} |')
      lines.append(f'| thief fine-tune, {trig} | unprotected | {unp["asr_raw"]:.4f} | '
                   f'{unp["asr_raw_before"]:.4f} | {unp["clean_acc_raw"]:.4f} |')
    for rate, v in sections['backdoor']['owner_poisoning'].items():
      lines.append(f'| owner data {rate} poisoned | licensed | {v["asr_licensed"]:.4f} | — | '
                   f'{v["clean_acc_licensed"]:.4f} |')
      lines.append(f'| owner data {rate} poisoned | unprotected | {v["asr_unprotected"]:.4f} | — | '
                   f'{v["clean_acc_unprotected"]:.4f} |')
  lines += ['', 'Seconds per section: ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()), '']
  return '\n'.join(lines)


def figure(path, sections: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  if 'forgery' in sections:
    s = sections['forgery']
    axes[0].hist(s['forged_acc'], bins=30, color='tab:red')
    axes[0].axvline(s['figures']['authorized_acc'], color='tab:green', label='true key')
    axes[0].set(title=f'{len(s["forged_acc"])} forged keys', xlabel='accuracy', ylabel='keys')
    axes[0].legend(fontsize=7)
    fr = sorted(s['near_keys'], key=float)
    axes[1].plot([float(x) for x in fr], [s['near_keys'][x]['max'] for x in fr], 'o-', label='near key (max)')
    axes[1].set(title='near keys', xlabel='share of key pixels re-randomized', ylabel='accuracy', ylim=(0, 1))
  if 'adversarial' in sections:
    rows = {k: v for k, v in sections['adversarial'].items() if k.startswith('eps=')}
    names = ['pgd_unprotected', 'pgd_keyless', 'pgd_adaptive']
    for i, (eps, row) in enumerate(rows.items()):
      axes[2].bar(np.arange(3) + 0.35 * i, [row[n] for n in names], width=0.35, label=eps)
    axes[2].set_xticks(np.arange(3) + 0.175, ['unprotected', 'keyless', 'adaptive'])
    axes[2].set(title='PGD robust accuracy', ylim=(0, 1))
    axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format='png')
  plt.close(fig)
