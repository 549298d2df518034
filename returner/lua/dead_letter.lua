-- Move one delivery to the dead-letter stream: add the dead letter, then ack and
-- delete the entry, all at once.
-- KEYS[1] stream  KEYS[2] dead-letter stream {L}:dead
-- ARGV[1] group  ARGV[2] entry ID  ARGV[3..] field, value pairs of the dead letter
-- Returns: the dead letter's ID
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
