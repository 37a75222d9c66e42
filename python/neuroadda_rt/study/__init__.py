"""The research harness: synthetic EM domains, zoo building and the paper's study.

Built on the public library and never imported by it (the top of the import layers):

- :mod:`~neuroadda_rt.study.synthetic` -- synthetic EM volumes, artefacts and domain families
  on a random tree;
- :mod:`~neuroadda_rt.study.zoo_build` -- train one source per domain of a family and write the
  zoo (``neuroadda-rt zoo build``);
- :mod:`~neuroadda_rt.study.experiments` -- the study runner (``neuroadda-rt experiment``): it
  calls :func:`~neuroadda_rt.rank_sources`, :func:`~neuroadda_rt.select_tiles`,
  :func:`~neuroadda_rt.finetune` and :func:`~neuroadda_rt.evaluate` themselves, so a study
  measures what a user's calls compute.
"""
