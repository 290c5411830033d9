"""bkfac.inverses"""
