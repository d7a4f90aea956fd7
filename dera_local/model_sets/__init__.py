"""What is loaded and generated from: the base every model set shares (`base`), a DeRa
pair (`pair`), mixtures and proxy-tuning (`mixture`, `mix_spec`), loading and
validation (`loading`), and the guard that keeps a set to one user at a time
(`guard`).
"""
