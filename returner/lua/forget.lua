-- Remove a consumer from the group, but only if it holds no pending entries:
-- deleting a consumer discards its pending entries, so one that holds any stays.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2] consumer
-- Returns: 1 if removed, 0 if it still holds entries or does not exist
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #held > 0 then
  return 0
end
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  for i = 1, #info, 2 do
    if info[i] == 'name' and info[i + 1] == ARGV[2] then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
  end
end
return 0
