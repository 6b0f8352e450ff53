"""A study run at a tiny budget on the generated data sets, its outputs checked against what it returned."""

import json

from bnjax.lab import studies


def run_tiny(name, tmp_path, data_dir, **overrides):
  """`(results, its folder)` of study `name` with `overrides`, run quietly into `tmp_path`."""
  results = studies.run_study(name, tmp_path, overrides=overrides, data_dir=data_dir, command='test',
                              log=lambda message: None)
  out = tmp_path / name
  saved = json.loads((out / 'results.json').read_text())
  assert saved['settings'] == results['settings'] and saved['table'] == results['table']
  assert results['table'] in (out / 'table.md').read_text()
  assert results['environment']['platform'] == 'cpu'
  return results, out
