"""Studies: commands that run stages of the stage table over one or more configs and put the results side by side.

- :mod:`~mlpmem.studies.pipeline`: every stage in order on one config (`mlpmem pipeline`);
- :mod:`~mlpmem.studies.compare`: the paper's variants (vanilla, fine-tuned, LoRA, the alpha = 0 control, joint),
  each a run directory, in one table with bootstrap intervals (`mlpmem compare`);
- :mod:`~mlpmem.studies.sweep`: points over settings, each a run directory linking what it shares with the base
  run (`mlpmem sweep`); :mod:`~mlpmem.studies.scaling` is its view over corpus and memory sizes;
- :mod:`~mlpmem.studies.common`: what they share: running a stage timed (``timings.json``), linking a shared
  output into a run directory, the joint pair's eval config, the interval format.

They sit above the stages (entry-point layer) and import each other only downwards: common < scaling < sweep.
"""
