"""The README and docs/: links to files that exist, nothing cited from outside the repository, and a
README short enough to be the front door."""

import os
import re

import pytest

from tests.conftest import REPO

def read(path: str) -> str:
  with open(path, errors='ignore') as f:
    return f.read()


DOCS = ['README.md'] + [os.path.join('docs', f) for f in sorted(os.listdir(os.path.join(REPO, 'docs')))
                        if f.endswith('.md')]
# Markdown links, and backticked repository paths such as `configs/default.py` or `securenet_jax/x/`.
LINK = re.compile(r'\]\(([^)#\s]+)(?:#[^)]*)?\)')
PATH = re.compile(r'`((?:configs|securenet_jax|docs|tests|launch|scripts|benchmarks)/[A-Za-z0-9_./-]*)')


@pytest.mark.parametrize('doc', DOCS)
def test_links_point_at_files_in_the_repository(doc):
  text = read(os.path.join(REPO, doc))
  base = os.path.dirname(os.path.join(REPO, doc))
  for target in LINK.findall(text):
    if target.startswith(('http://', 'https://', 'mailto:')):
      continue
    assert os.path.exists(os.path.normpath(os.path.join(base, target))), f'{doc}: dead link {target}'
  for path in PATH.findall(text):
    path = path.rstrip('.').split(':')[0]
    if '*' in path or '<' in path:
      continue
    assert os.path.exists(os.path.join(REPO, path)), f'{doc}: no such file {path}'


def test_nothing_cites_files_outside_the_repository():
  pattern = re.compile(r'DESIGN\.md|STYLE\.md|\.\./shared')
  for root, _, files in os.walk(REPO):
    if any(part in root for part in ('.git', '.venv', 'workdirs', '__pycache__', '.egg-info')):
      continue
    for name in files:
      if name.endswith(('.py', '.md', '.sh', '.toml', '.cfg')) and name != 'test_docs.py':
        text = read(os.path.join(root, name))
        assert not pattern.search(text), os.path.join(root, name)


def test_readme_is_a_front_door():
  lines = read(os.path.join(REPO, 'README.md')).splitlines()
  assert len(lines) <= 150
  assert any('inference.load(' in line for line in lines[:80]), 'the API example belongs near the top'


def test_readme_api_example_runs_as_written(trained_workdir, capsys):
  """The README's "Using a trained model" block, run on a trained workdir in place of
  workdirs/default."""
  text = read(os.path.join(REPO, 'README.md'))
  section = text.split('## Using a trained model', 1)[1]
  code = section.split('```python\n', 1)[1].split('```', 1)[0]
  assert "inference.load('workdirs/default')" in code
  code = code.replace('workdirs/default', trained_workdir)
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  printed = dict(line.split(':', 1) for line in capsys.readouterr().out.strip().splitlines())
  assert float(printed['with the key']) >= 0.9
  assert float(printed['without it']) <= 0.2 and float(printed['forged key']) <= 0.3
