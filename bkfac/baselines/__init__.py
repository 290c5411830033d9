"""bkfac.baselines"""
