import numpy as np, tifffile, time, torch, sys, json
sys.path.insert(0,'.'); sys.path.insert(0,'benchmarks')
from napari_coarseseg import simulate, train_refineseg, run_to_end, predict, load_preset
from baselines import train_dense, predict_dense, random_forest_segment
im=tifffile.imread('sample_data/dsb2018_nuclei/image.tif'); lb=tifffile.imread('sample_data/dsb2018_nuclei/labels.tif')
s=simulate(lb, instances=True)
Q=[(slice(0,256),slice(0,256)),(slice(0,256),slice(256,512)),(slice(256,512),slice(0,256)),(slice(256,512),slice(256,512))]
def dice(a,b): return 2*(a&b).sum()/(a.sum()+b.sum())
configs=json.loads(sys.argv[1]); dev=sys.argv[2]
T=[0.5,0.6,0.7,0.8,0.9]
for cfg in configs:
    ds=[];ar=[];th=[]
    t=time.time()
    kw=dict(cfg); kind=kw.pop('_kind','refine')
    for f in json.loads(sys.argv[3]) if len(sys.argv)>3 else range(4):
        test=Q[f]; train=[q for i,q in enumerate(Q) if i!=f]
        gt=lb[test]>0
        if kind=='refine':
            model=run_to_end(train_refineseg([im[t_] for t_ in train],[[s.positive[t_] for t_ in train]],[[s.negative[t_] for t_ in train]],device=dev,**kw))
            p=predict(model, im[test],device=dev); pr=p.labels>0
            p0=predict(model, im[test],device=dev,prior_correction=False)
            th.append([dice(gt,p0.labels>0), model.card['prior']['estimated'][1]])
        elif kind in ('full','naive'):
            cfgo=load_preset('refineseg').replace(**kw)
            masks=[(lb[t_]>0) if kind=='full' else (s.positive[t_]>0) for t_ in train]
            net,_=train_dense([im[t_] for t_ in train],masks,cfgo,device=dev)
            pr=predict_dense(net, im[test], dev)>0
        elif kind=='rf':
            labs=[np.where(s.positive[t_]>0,2,np.where(s.negative[t_]>0,1,0)) for t_ in train]
            pr,_=random_forest_segment([im[t_] for t_ in train],labs,im[test]); pr=pr>0
        ds.append(dice(gt,pr)); ar.append(pr.sum()/gt.sum())
    print(json.dumps(cfg), 'dice', np.round(ds,4), 'mean', round(float(np.mean(ds)),4), 'area', np.round(ar,3), 'thr', np.round(np.mean(th,0),4) if th else '', 'sec', round(time.time()-t,1), flush=True)
