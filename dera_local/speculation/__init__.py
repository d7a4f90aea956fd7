"""Speculative decoding that never changes what is sampled: drafts by prompt lookup or
a draft model (`drafts`), the adaptive draft length (`draft_length`) from measured step
costs (`step_costs`), a slot's drafting state (`slot_drafts`), and the measurement
probe behind `dera-local info --measure-speculation` (`probe`).
"""
