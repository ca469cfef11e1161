"""The engine every experiment runs on: interventions as data and the hooks they install, the sweep that
runs many of them in few forwards, metrics, results, argument checks, statistics and the experiment
registry. It imports nothing else of `patching`."""
