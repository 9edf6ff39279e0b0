import sys, time; sys.path.insert(0,'/tmp/review-track')
from resp import *
a=Conn(7710); a.c('HELLO','3'); t0=time.time(); print('TRACKING ON ->', a.c('CLIENT','TRACKING','ON'), round(time.time()-t0,2),'s')
a.c('SET','k','1'); print('GET', a.c('GET','k'))
d=Conn(7603); d.c('AUTH','sg','sgpw'); d.c('SET','k','2'); time.sleep(0.3)
print('after direct write:', a.drain(0.5), 'TRACKINGINFO', a.c('CLIENT','TRACKINGINFO'))
b=Conn(7710); b.c('SET','k','3'); time.sleep(0.3); print('after write via proxy:', a.drain(0.5))
