"""The science helpers: a lam sweep as parallel slots (`sweep`), teacher-forced scores
and KL under every lam (`score`), and their summaries and plots (`report`).
"""
