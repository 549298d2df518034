-- Acknowledge entries whose outcome is durable, and delete them so the stream
-- never grows without bound. Atomic: an acked entry is never left behind.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2..] entry IDs
-- Returns: the number of entries acknowledged
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return n
