#!/usr/bin/env bash
# By-hand proof behind tests/integrations/test_flux_example.py: the whole kit (compile and 2-rank
# USP included) on the diffusers-Flux example and on each of its three mutations
# (tests/kit_plugins/flux_mutants.py). Every check passes on the example; on each mutation every
# check passes except reference-parity, which names the stage the mutation breaks.
# Output recorded in docs/fidelity.md. Run from the repository root with the venv active.
set -u
export PYTHONPATH="$PWD:$PWD/examples/ditkit-diffusers-flux${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
timeout 900 python -m core.cli check diffusers-flux --plugin ditkit_diffusers_flux.plugin --usp 2 --max-examples 1 --strict 2>/dev/null || status=1
for name in flux-wrong-schedule flux-wrong-guidance flux-unscaled-decode; do
  # exit status 1 expected: reference-parity fails
  timeout 900 python -m core.cli check "$name" --plugin tests.kit_plugins.flux_mutants --usp 2 --max-examples 1 2>/dev/null
  [ $? -eq 1 ] || status=1
done
exit $status
