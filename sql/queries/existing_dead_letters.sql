-- Which of a batch's dead letters (topic, partition, offset) are stored already.
SELECT partition, offset
FROM dead_letters
WHERE topic = {topic:String}
  AND offset BETWEEN {offset_from:UInt64} AND {offset_to:UInt64}
