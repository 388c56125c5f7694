"""Every training algorithm's objective as pure functions of tensors, one file per algorithm.

Trainers (:mod:`visalign.algorithms`) call these; tests pin them against hand-computed numbers; the
formulas are written out in docs/math.md (§2 GRPO, §3 DPO, §4 PRDP, §5 DRaFT).
"""
