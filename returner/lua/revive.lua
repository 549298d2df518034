-- Move one dead letter back into the stream for another try, at once: the task
-- bytes become a new entry and the dead letter is deleted.
-- KEYS[1] stream  KEYS[2] dead-letter stream
-- ARGV[1] dead letter ID
-- Returns: the new entry's ID, or false when the dead letter no longer exists
local found = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #found == 0 then
  return false
end
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'task' then
    local id = redis.call('XADD', KEYS[1], '*', 'task', fields[i + 1])
    redis.call('XDEL', KEYS[2], ARGV[1])
    return id
  end
end
return false
