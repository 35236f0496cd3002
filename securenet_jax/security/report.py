"""The security report: security.json (flat figures + nested sections), security.md, security.png."""

from __future__ import annotations

import json

import numpy as np
from absl import logging

from securenet_jax import metrics
from securenet_jax import workdir as workdir_lib


def write(report_dir, config, flat: dict, sections: dict, timings: dict) -> None:
  """Writes security.json, security.md and security.png into ``report_dir``."""
  smoke = bool(config.smoke)
  report = metrics.rounded(dict(flat, sections=sections, timings_s=timings, smoke=smoke,
                                target_workdir=str(workdir_lib.Workdir(config.target_workdir)),
                                config=json.loads(config.to_json_best_effort())))
  workdir_lib.write_json(report_dir / 'security.json', report)
  workdir_lib.atomic_write(report_dir / 'security.md', markdown(flat, sections, timings, smoke))
  try:
    workdir_lib.atomic_write_with(report_dir / 'security.png', lambda f: figure(f, sections, smoke))
  except Exception as e:  # pylint: disable=broad-except  (a figure must not cost the report)
    logging.warning('Could not draw the security figure: %s', e)


def markdown(flat: dict, sections: dict, timings: dict, smoke: bool = False) -> str:
  lines = ['# Security report', '']
  if smoke:
    lines += ['**Smoke run** (a few steps per attack, to test the code): the figures say nothing about '
              'the method.', '']
  lines += ['| figure | value |', '| --- | --- |']
  lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in flat.items()]
  if 'adversarial' in sections:
    lines += ['', '## Adversarial (robust accuracy)', '', '| eps | attack | value |', '| --- | --- | --- |']
    for eps, row in sections['adversarial'].items():
      if isinstance(row, dict) and eps.startswith('eps='):
        lines += [f'| {eps[4:]} | {k} | {v:.4f} |' for k, v in row.items()]
  if 'keysearch' in sections and 'history' in sections['keysearch']:
    ks = sections['keysearch']
    lines += ['', "## Key search: the key's bits inverted one at a time (white-box, labeled data)", '',
              f'{ks["data_size"]} labeled images, {ks["elements"]} key elements; first stage from '
              f'{len(ks["first_stage"])} random keys, ends: '
              + ', '.join(f'{v:.3f}' for v in ks['first_stage']) + '.', '',
              '| stage | objective | elements changed |', '| --- | --- | --- |']
    lines += [f'| {h["stage"]} | {h["objective"]:.4f} | {h["changed"]} |' for h in ks['history']]
    lines += ['', f'Recovered key: test accuracy {ks["figures"]["keysearch_acc"]:.4f}, on the thief\'s data '
              f'{ks["thief_data_acc"]:.4f}, agreement with the true key '
              f'{ks["figures"]["keysearch_agreement"]:.3f}, {ks["seconds"]:.0f} s.']
  if 'theft' in sections:
    lines += ['', '## Theft: a thief with the weights and k% of the labels (accuracy without key)', '',
              'Gain = best move - training from scratch on the same data.', '']
    for k, row in sections['theft'].items():
      if not isinstance(row, dict) or 'licensed' not in row:
        continue
      lic = row['licensed']
      unp = row.get('unprotected', {'moves': {}, 'best_move': 'not run', 'gain': float('nan')})
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


def figure(path, sections: dict, smoke: bool = False) -> None:
  """Four panels on 0-1 accuracy axes with their values: forged keys, near keys, what a thief with
  labels gets (licensed vs unprotected, against scratch), PGD robust accuracy."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for the report)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.9), layout='constrained')
  if 'forgery' in sections:
    s = sections['forgery']
    axes[0].hist(s['forged_acc'], bins=np.linspace(0, 1, 41), color='tab:red', label='forged keys')
    axes[0].axvline(s['figures']['authorized_acc'], color='tab:green', label='the key')
    axes[0].set(title=f'{len(s["forged_acc"])} forged keys (max {max(s["forged_acc"]):.3f})',
                xlabel='accuracy', ylabel='number of keys', xlim=(0, 1))
    axes[0].legend(fontsize=7)
    fr = sorted(s['near_keys'], key=float)
    maxima = [s['near_keys'][x]['max'] for x in fr]
    axes[1].plot([float(x) for x in fr], maxima, 'o-', label='near key (max)')
    for x, y in zip(fr, maxima):
      axes[1].annotate(f'{y:.2f}', (float(x), y), fontsize=7, textcoords='offset points', xytext=(0, 4))
    axes[1].set(title='near keys: the key with a share redrawn', xlabel='share of the key redrawn',
                ylabel='accuracy', ylim=(0, 1.05), xlim=(0, 1.05))
  if 'theft' in sections:
    rows = [(k, v) for k, v in sections['theft'].items() if isinstance(v, dict) and 'licensed' in v]
    x = np.arange(len(rows))
    series = [('scratch', [v['licensed']['scratch_acc'] for _, v in rows], 'tab:gray'),
              ('licensed: best move', [v['licensed']['best_acc'] for _, v in rows], 'tab:blue'),
              ('unprotected: best move', [v.get('unprotected', {}).get('best_acc', np.nan) for _, v in rows],
               'tab:orange')]
    for i, (label, values, color) in enumerate(series):
      bars = axes[2].bar(x + 0.27 * (i - 1), values, width=0.27, label=label, color=color)
      axes[2].bar_label(bars, labels=[f'{v:.3f}' for v in values], fontsize=6, rotation=90, padding=2)
    axes[2].set_xticks(x, [f'{k} of labels' for k, _ in rows])
    axes[2].set(title='a thief with the weights and labels', ylabel='accuracy without key', ylim=(0, 1.15))
    axes[2].legend(fontsize=7, loc='lower right')
  if 'adversarial' in sections:
    rows = {k: v for k, v in sections['adversarial'].items() if k.startswith('eps=')}
    names = ['pgd_unprotected', 'pgd_keyless', 'pgd_adaptive']
    for i, (eps, row) in enumerate(rows.items()):
      bars = axes[3].bar(np.arange(3) + 0.35 * i, [row[n] for n in names], width=0.35, label=eps)
      axes[3].bar_label(bars, labels=[f'{row[n]:.2f}' for n in names], fontsize=7, padding=2)
    axes[3].set_xticks(np.arange(3) + 0.175, ['unprotected', 'licensed, keyless', 'licensed, adaptive'])
    axes[3].set(title='PGD robust accuracy', ylabel='accuracy', ylim=(0, 1.1))
    axes[3].legend(fontsize=7)
  for ax in axes:
    if not ax.has_data():
      ax.axis('off')
  if smoke:
    fig.suptitle('SMOKE RUN: the figures say nothing about the method', color='tab:red', fontsize=10)
  fig.savefig(path, dpi=110, format='png')
  plt.close(fig)
