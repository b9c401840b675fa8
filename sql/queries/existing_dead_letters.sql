-- Which of a batch's dead letters are stored already: the same message (its bytes'
-- MD5) at the same place (topic, partition, offset). The place alone is not enough: a
-- broker that lost its log (the embedded one, restarted; a topic recreated) gives its
-- offsets again, to other messages.
SELECT partition, offset, lower(hex(MD5(raw))) AS digest
FROM dead_letters
WHERE topic = {topic:String}
  AND partition IN {partitions:Array(UInt32)}
  AND offset BETWEEN {offset_from:UInt64} AND {offset_to:UInt64}
