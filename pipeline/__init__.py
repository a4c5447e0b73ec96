"""The transfer study as a library: ``study.py`` is its parameter block and one call of ``run_study``.

- ``settings``: the study's parameters checked and resolved into a ``StudyPlan`` (torch-free);
- ``layout``: every folder and file name of a study, for the stages and the report;
- ``steps``: stages of resumable steps, their markers, logs and progress lines;
- ``stages``: the eight stages, one function each, each building its library's typed configuration;
- ``checks``: what is checked before the first file is written, and the inputs digest of a step;
- ``launch``: entry points as jobs (shared with sweep.py);
- ``results`` and ``report``: the results computed from the study's folders, then rendered (TSV, markdown, HTML,
  figures);
- ``run``: the whole study.
"""
