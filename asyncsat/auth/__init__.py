"""How requests of an account are authorised: logins, and tokens shared per account."""
