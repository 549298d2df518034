-- Claim entries that any consumer has left idle, with their delivery counts.
-- Works with both XAUTOCLAIM replies: Redis 7 lists deleted IDs in a third element
-- (already dropped from the pending list); Redis 6.2 returns nil in place of a
-- deleted entry and keeps it pending under the claimer, so those are found in the
-- claimer's pending list and acked here.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] min idle ms  ARGV[4] start ID  ARGV[5] count
-- Returns: {next_start, entries, gone} where entries is an array of {id, fields, deliveries}
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', tonumber(ARGV[5]))
local out, gone, nils = {}, 0, 0
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    out[#out + 1] = {e[1], e[2], p[1][4]}
  else
    nils = nils + 1
  end
end
if r[3] then
  gone = gone + #r[3]
end
if nils > 0 then
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
  for _, p in ipairs(mine) do
    if #redis.call('XRANGE', KEYS[1], p[1], p[1]) == 0 then
      redis.call('XACK', KEYS[1], ARGV[1], p[1])
      gone = gone + 1
    end
  end
end
return {r[1], out, gone}
