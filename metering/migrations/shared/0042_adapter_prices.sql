-- A customer's adapter may have a price of its own: the price table as given (JSON with the
-- keys of a model's `price` in models.toml, decimal strings), validated by the gateway before
-- it is stored. NULL: the base model's price, as before.
ALTER TABLE customer_adapters ADD COLUMN price TEXT;
