"""Case studies: the analysis packages composed into findings a researcher can read and check.

Each study is an `Analysis` entry (``study/induction``, ``study/ioi``, ``study/qa``) whose summary states what
was found as numbers measured in that run, with confidence intervals where they are estimates, and whose
``findings.md`` says it in words. See docs/METHODS.md, "Case studies".
"""
