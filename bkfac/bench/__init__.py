"""bkfac.bench"""
