-- Reset the idle time of entries this consumer still owns, without counting a
-- delivery (XCLAIM JUSTID), so that no one claims work in hand. Entries another
-- consumer has taken over meanwhile are left to it.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2] consumer  ARGV[3..] entry IDs
-- Returns: the number of entries touched
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
