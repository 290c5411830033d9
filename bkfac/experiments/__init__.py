"""bkfac.experiments"""
